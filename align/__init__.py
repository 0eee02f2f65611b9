"""align: SFT, reward modelling, PPO and DPO for language models on one consumer GPU (or a CPU)."""

__version__ = "0.1.0"


def _quiet_bitsandbytes_kernels_warning() -> None:
    """bitsandbytes warns on import, on every avx512_bf16 CPU, that the optional `kernels` package is missing,
    even in runs that never quantize. Its own kernel is used instead; the startup line (align.models.
    compute_note) says which 4-bit path a quantized run takes, so the warning only adds noise."""
    import logging

    class _DropKernelsNote(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "kernels-community" not in record.getMessage()

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNote())


_quiet_bitsandbytes_kernels_warning()
