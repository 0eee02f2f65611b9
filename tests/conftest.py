import os
import sys
from pathlib import Path

# Tests are offline: a Hub call must fail at once, never after ~20 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

# The checkout (align, bench, tools) and tests/support (recipe_harness, repo_paths, ...) import from every folder.
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests" / "support"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random causal LM with a locally built tokenizer (shared by the session; do not modify)."""
    from align.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_quant_model_dir(tmp_path_factory) -> str:
    """The tiny causal LM at widths every bitsandbytes 4-bit path accepts (hidden 64, MLP 128; heads of 16): the
    avx512_bf16 CPU kernel needs input widths that are multiples of the 64-wide quantization block, which the
    32-wide tiny model is not (align.models.loading.check_4bit_widths). For every test that quantizes."""
    from align.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_quant") / "model", hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> str:
    from align.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_rm") / "model", task="reward")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test (or the benchmark harness it runs) may change torch's thread count; do not let it leak into
    the next test, whose numerics (reduction order) would then differ from running it alone."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads on a shared 2-core machine make tiny matmuls ~100x slower
    (spin-waits). _restore_torch_threads puts the count back after the test."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def prepare_as_trainer():
    """prepare(model): the model as a Trainer with bf16=True leaves it after training, its forward wrapped by
    accelerate (autocast, outputs copied to float32), through a real Accelerator(mixed_precision="bf16"). accelerate's
    process-wide state is set aside for it and put back afterwards, so other tests keep theirs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    saved = dict(AcceleratorState._shared_state), dict(PartialState._shared_state)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield lambda model: Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    AcceleratorState._reset_state(reset_partial_state=True)
    AcceleratorState._shared_state.update(saved[0])
    PartialState._shared_state.update(saved[1])
