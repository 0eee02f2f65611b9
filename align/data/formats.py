"""Row formats -> canonical records (align.records): detection, field checks and one converter per format;
see align.data for the formats."""

from __future__ import annotations

import itertools
import re
from typing import Any, Callable, Literal, Union

from align.errors import DataError
from align.records import Message, PreferencePair, PromptRecord, SFTExample, check_messages, is_finite_number, short_repr

PREFERENCE_FORMATS = ("strings", "conversational", "hh", "ranked")
SFT_FORMATS = ("messages", "prompt_completion")
FORMATS = PREFERENCE_FORMATS + SFT_FORMATS + ("prompt", "ifeval")

# Required fields of each format; conversational rows may also have "prompt", ranked rows need one of
# RANK_FIELDS. META_FIELDS are allowed in every format.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "strings": ("prompt", "chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt": ("prompt",),
    "ifeval": ("prompt", "instruction_id_list", "kwargs"),
}
META_FIELDS = ("id", "constraints", "meta", "margin")
RANK_FIELDS = ("scores", "ranking")
_OPTIONAL_FIELDS = {"conversational": ("prompt",), "ranked": RANK_FIELDS, "ifeval": ("key",)}


Kind = Literal["prefs", "sft", "prompts"]
Record = Union[PreferencePair, SFTExample, PromptRecord]


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def detect_format(row: Any, where: str = "row") -> str:
    """The format of one row, from its fields: one of FORMATS. Raises DataError when no format fits."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(row)}")
    keys = {k for k, v in row.items() if v is not None}
    if "responses" in keys:
        return "ranked"
    if "chosen" in keys or "rejected" in keys:
        reply = row.get("chosen", row.get("rejected"))
        if isinstance(reply, list):
            return "conversational"
        return "strings" if "prompt" in keys else "hh"
    if "messages" in keys:
        return "messages"
    if "completion" in keys:
        return "prompt_completion"
    if "instruction_id_list" in keys:
        return "ifeval"
    if "prompt" in keys:
        return "prompt"
    raise DataError(
        f"{where}: cannot tell the format from the fields {sorted(map(str, row))}; expected prompt/chosen/rejected, "
        "chosen/rejected (HH), prompt/responses with scores or ranking, messages, prompt/completion, prompt, or IFEval's prompt/instruction_id_list/kwargs"
    )


def _check_fields(row: dict, fmt: str, where: str, extra_fields: str) -> None:
    required = FORMAT_FIELDS[fmt]
    for name in required:
        if name not in row:
            raise DataError(f"{where}: field '{name}': missing or null (format '{fmt}' needs {', '.join(required)})")
    if extra_fields == "ignore":
        return
    known = set(required) | set(META_FIELDS) | set(_OPTIONAL_FIELDS.get(fmt, ()))
    for name in row:
        if name not in known:
            raise DataError(
                f"{where}: field {short_repr(str(name))}: not a field of format '{fmt}' (known: {', '.join(sorted(known))}); "
                "pass extra_fields='ignore' to ignore it"
            )


def _meta(row: dict) -> dict[str, Any]:
    """The metadata every record keeps (checked by the record itself)."""
    return {"constraints": row.get("constraints"), "id": row.get("id")}


def _text(row: dict, name: str, where: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_type_name(value)}")
    return value


def _prompt_messages(value: Any, where: str) -> list[Message]:
    """A prompt given as a string (one user turn) or as chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt': the prompt is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return check_messages(value, where, field_name="prompt")
    raise DataError(f"{where}: field 'prompt': expected a string or a list of {{role, content}} messages, got {_type_name(value)}")


def _message_list(row: dict, name: str, where: str) -> list[Message]:
    value = row[name]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}': expected a list of {{role, content}} messages, got {_type_name(value)}")
    return check_messages(value, where, field_name=name)


def _single_reply(messages: list[Message], where: str, name: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        got = ", ".join(m["role"] for m in messages) or "nothing"
        raise DataError(f"{where}: field '{name}': expected one assistant message after the prompt, got {got}")
    return messages[0]["content"]


def _check_replies_alike(row: dict, where: str) -> None:
    """chosen and rejected both reply strings or both message lists: one of each has no single reading."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    kinds = {name: "a string" if isinstance(value, str) else "a list" for name, value in (("chosen", chosen), ("rejected", rejected))}
    if isinstance(chosen, (str, list)) and isinstance(rejected, (str, list)) and kinds["chosen"] != kinds["rejected"]:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected': 'chosen' is {kinds['chosen']} but 'rejected' is {kinds['rejected']}; "
            "give both as reply strings (the prompt in 'prompt') or both as lists of {role, content} messages"
        )


def _pairs_from_strings(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    _check_replies_alike(row, where)
    # The prompt may be chat messages (a system turn, earlier turns) while the replies are plain strings.
    prompt = _prompt_messages(row["prompt"], where)
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    return [PreferencePair(prompt, chosen, rejected, where, margin=row.get("margin"), **_meta(row))]


def _pairs_from_conversation(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    _check_replies_alike(row, where)
    chosen, rejected = _message_list(row, "chosen", where), _message_list(row, "rejected", where)
    if "prompt" in row:
        prompt = _prompt_messages(row["prompt"], where)
        n = len(prompt)
        # TRL's older format (and e.g. ultrafeedback_binarized) repeat the prompt at the start of each reply.
        if chosen[:n] == prompt and len(chosen) > n:
            chosen = chosen[n:]
        if rejected[:n] == prompt and len(rejected) > n:
            rejected = rejected[n:]
    else:
        # Implicit prompt: two whole conversations; the prompt is what they share.
        if chosen == rejected:
            raise DataError(f"{where}: fields 'chosen' and 'rejected': identical conversations carry no preference")
        n = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        if n == 0:
            raise DataError(
                f"{where}: fields 'chosen' and 'rejected': without a 'prompt' field they must be whole conversations "
                "that share the prompt, but they differ from the first message"
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return [
        PreferencePair(
            prompt, _single_reply(chosen, where, "chosen"), _single_reply(rejected, where, "rejected"), where,
            margin=row.get("margin"), **_meta(row),
        )
    ]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(row: dict, name: str, where: str) -> list[Message]:
    text = _text(row, name, where)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: field '{name}': expected an HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}': the transcript must end with an Assistant reply")
    return turns


def _pairs_from_hh(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    chosen, rejected = _hh_turns(row, "chosen", where), _hh_turns(row, "rejected", where)
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)) - 1)
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected': the transcripts do not share a prefix (they differ at turn "
            f"{turn + 1}); HH rows must differ only in the final Assistant reply"
        )
    return [PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], where, margin=row.get("margin"), **_meta(row))]


def _response_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        (message,) = check_messages([value], where, field_name=name)
        if message["role"] != "assistant":
            raise DataError(f"{where}: field '{name}.role': expected 'assistant', got {message['role']!r}")
        value = message["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string or an assistant message, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}': the reply is empty")
    return value


def _scores(row: dict, where: str, n: int) -> tuple[str, list[float]]:
    """(field name, scores with higher = better) from `scores` or `ranking` (1 = best)."""
    given = [name for name in RANK_FIELDS if name in row]
    if len(given) != 1:
        raise DataError(f"{where}: field 'scores': expected either 'scores' (higher is better) or 'ranking' (1 = best), got {given or 'neither'}")
    (name,) = given
    values = row[name]
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else _type_name(values)
        raise DataError(f"{where}: field '{name}': expected a list of {n} numbers, one per response, got {got}")
    for i, v in enumerate(values):
        if not is_finite_number(v):
            raise DataError(f"{where}: field '{name}[{i}]': expected a finite number, got {short_repr(v)}")
    return name, [float(v) if name == "scores" else -float(v) for v in values]


def _pairs_from_ranked(row: dict, where: str, pairs: str) -> list[PreferencePair]:
    prompt = _prompt_messages(row["prompt"], where)
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses': expected a list of at least 2 responses, got {_type_name(responses)}")
    texts = [_response_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
    name, scores = _scores(row, where, len(texts))
    if pairs == "all":
        ranked = [(i, j) if scores[i] > scores[j] else (j, i) for i, j in itertools.combinations(range(len(texts)), 2) if scores[i] != scores[j]]
    else:
        top = max(scores)
        ranked = [(i, j) for i in range(len(texts)) if scores[i] == top for j in range(len(texts)) if scores[j] < top]
    if not ranked:
        raise DataError(f"{where}: field '{name}': all responses tie, so there is no preference to learn")
    for i, j in ranked:
        if texts[i].strip() == texts[j].strip():
            raise DataError(f"{where}: fields 'responses[{i}]' and 'responses[{j}]': identical replies with different {name}")
    return [PreferencePair(prompt, texts[i], texts[j], where, **_meta(row)) for i, j in ranked]


def _sft_from_messages(row: dict, where: str) -> SFTExample:
    return SFTExample(_message_list(row, "messages", where), where, **_meta(row))


def _completion_messages(row: dict, where: str) -> list[Message]:
    value = row["completion"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'completion': the reply is empty")
        return [{"role": "assistant", "content": value}]
    messages = _message_list(row, "completion", where)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise DataError(f"{where}: field 'completion[{i}].role': expected 'assistant', got {m['role']!r}")
    return messages


def _sft_from_prompt_completion(row: dict, where: str) -> SFTExample:
    prompt = _prompt_messages(row["prompt"], where)
    return SFTExample(prompt + _completion_messages(row, where), where, **_meta(row))


_PAIR_ADAPTERS: dict[str, Callable[[dict, str, str], list[PreferencePair]]] = {
    "strings": _pairs_from_strings,
    "conversational": _pairs_from_conversation,
    "hh": _pairs_from_hh,
    "ranked": _pairs_from_ranked,
}
_SFT_ADAPTERS: dict[str, Callable[[dict, str], SFTExample]] = {
    "messages": _sft_from_messages,
    "prompt_completion": _sft_from_prompt_completion,
}


def _prompt_from_row(fmt: str, row: dict, where: str) -> PromptRecord:
    """A prompt for generation from a row of any format; a known good reply becomes `reference_reply`."""
    if fmt in _PAIR_ADAPTERS:
        best = _PAIR_ADAPTERS[fmt](row, where, "best_vs_each")[0]
        return PromptRecord(best.prompt, where, best.constraints, reference_reply=best.chosen, id=best.id)
    if fmt in _SFT_ADAPTERS:
        messages = _SFT_ADAPTERS[fmt](row, where).messages
        # The prompt is the conversation up to its last assistant turn, which is the reference reply.
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return PromptRecord(messages[:last], where, reference_reply=messages[last]["content"], **_meta(row))
    if fmt == "ifeval":
        return PromptRecord(_prompt_messages(row["prompt"], where), where, _ifeval_constraints(row, where), id=row.get("key"))
    return PromptRecord(_prompt_messages(row["prompt"], where), where, **_meta(row))


def _ifeval_constraints(row: dict, where: str) -> list[dict]:
    """The constraints of an IFEval row (google-research/instruction_following_eval's input_data.jsonl): each
    instruction id with its kwargs, by position, as the constraint of ours with that meaning."""
    from align.evaluation.verifier import from_ifeval

    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(ids, list) or not ids:
        raise DataError(f"{where}: field 'instruction_id_list': expected a non-empty list of IFEval instruction ids, got {short_repr(ids)}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"{where}: field 'kwargs': expected a list of {len(ids)} objects, one per instruction id, got {short_repr(kwargs)}")
    return [from_ifeval(i, k, f"{where}: field 'instruction_id_list[{n}]'") for n, (i, k) in enumerate(zip(ids, kwargs))]


KIND_FORMATS = {"prefs": PREFERENCE_FORMATS, "sft": SFT_FORMATS, "prompts": FORMATS}
_KIND_NEEDS = {
    "prefs": "preference data needs prompt/chosen/rejected, chosen/rejected (HH) or prompt/responses with scores or ranking",
    "sft": "SFT data needs messages or prompt/completion",
}


def convert_row(kind: str, fmt: str, row: Any, where: str, pairs: str, extra_fields: str) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(row)}")
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(f"{where}: this row is in format '{fmt}' (fields {sorted(map(str, row))}), but {_KIND_NEEDS[kind]}")
    _check_fields(row, fmt, where, extra_fields)
    if kind == "prefs":
        return list(_PAIR_ADAPTERS[fmt](row, where, pairs))
    if kind == "sft":
        return [_SFT_ADAPTERS[fmt](row, where)]
    return [_prompt_from_row(fmt, row, where)]


