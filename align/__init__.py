"""align: SFT, reward modelling, PPO and DPO for language models on one consumer GPU (or a CPU)."""

__version__ = "0.1.0"


def _quiet_bitsandbytes_kernels_warning() -> None:
    """bitsandbytes tries on import, on every avx512_bf16 CPU, to fetch a 4-bit kernel from the Hub's
    kernels-community repository, even in runs that never quantize, and warns when it cannot: the optional `kernels`
    package is missing, or (transformers 5 installs it) the Hub is offline, where `kernels` adds a line of its own
    about skipping the publisher trust check. Its own kernel is used instead; the startup line
    (align.models.loading.compute_note) says which 4-bit path a quantized run takes, so these lines only add noise."""
    import logging

    class _DropKernelsNote(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "kernels-community" not in record.getMessage()

    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(_DropKernelsNote())


def _quiet_checkpointing_renames() -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing and warns (FutureWarning) when
    the old names are used: by TRL's configs (gradient_checkpointing defaults to True there), by TRL and peft
    reading `model.is_gradient_checkpointing`, and by align.trainers.common and align.models.loading, which keep the old names while
    transformers 4.57 (no activation_* names) is supported. A user cannot act on these; only they are dropped."""
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"`(is_)?gradient_checkpointing(_kwargs|_enable)?` is deprecated and will be removed in v6",
        category=FutureWarning,
        module=r"transformers\.",
    )


_quiet_bitsandbytes_kernels_warning()
_quiet_checkpointing_renames()
