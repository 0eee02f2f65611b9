"""Chat templates for training: loss on assistant turns only needs `{% generation %}` markers.

TRL ships marked-up training templates for many model families (Llama 3, Qwen, Gemma, Phi, ...). ChatML
templates such as SmolLM2's are not among them, so we mark them up here: the assistant's content and its
`<|im_end|>` (so the model learns to stop) are inside the markers; everything else renders unchanged.
"""

from __future__ import annotations

import re

from align.errors import ConfigError

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
