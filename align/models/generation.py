"""model.generate for every adapter we train, the virtual-token ones included.

peft 0.21 with transformers 5 gets generation wrong for every adapter made of virtual tokens:
- prompt tuning and p-tuning (virtual tokens as input embeddings): after the prefill,
  PeftModelForCausalLM.prepare_inputs_for_generation hands the model the embeddings of the whole prompt again at every
  decode step instead of the one new token, so the KV cache grows by the prompt's length per token and every step after
  the first attends to duplicated context (a 2-row, 17-token prompt fed (2, 33) then (2, 17) embeddings at each step;
  64 held-out prompts took over 8 minutes, stopped, instead of 43 s);
- prefix tuning (virtual keys and values in the KV cache): the prefix never reaches the model; the first step's logits
  equal the plain base model's (to 1e-7 on the tiny model), so a prefix-tuned policy answers as its base.
`generate_ids` does what peft's forward does in training instead: the virtual tokens' embeddings go before the
prompt's (prompt and p-tuning), or the adapter's prefix is the generation's starting cache (prefix tuning), their
attention mask ones, and the base model generates one token a step. Placeholder ids hold the virtual positions, so
the returned ids and the logits processors that read them (repetition penalty) see the prompt as without an adapter.
tests/unit/models/test_generation.py checks every step's logits against the training forward without a cache, and
that peft's own generate still differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def virtual_token_method(model) -> str | None:
    """The --peft name (align.models.loading.PROMPT_LEARNING) of `model`'s active adapter when it is made of
    virtual tokens and enabled; None for any other model or adapter, or inside `disable_adapter()`."""
    from align.models.loading import PROMPT_LEARNING, adapter_method

    method = adapter_method(model)
    return method if method in PROMPT_LEARNING and not getattr(model, "_adapters_disabled", False) else None


def generate_ids(model, input_ids: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
    """model.generate(input_ids=..., attention_mask=..., **kwargs) -> (batch, prompt + new) token ids, the prompt
    included, for any model; a virtual-token adapter's tokens go first, as in its training forward, and the base model
    generates (see the module docstring)."""
    method = virtual_token_method(model)
    if method is None:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    batch, base = input_ids.shape[0], model.get_base_model()
    n_virtual = model.active_peft_config.num_virtual_tokens
    # Placeholder ids stand for the virtual positions (generate counts positions by ids). Each row's first token
    # is one it already has, so logits processors that read the ids (repetition penalty) see the prompt's tokens
    # as they do without an adapter.
    ids = torch.cat([input_ids[:, :1].expand(batch, n_virtual), input_ids], dim=1)
    mask = torch.cat([attention_mask.new_ones(batch, n_virtual), attention_mask], dim=1)
    if method == "prefix_tuning":
        # The prefix is the starting cache. Every row's prefix is the same, so a cache row for every beam or
        # returned sequence fits however generate orders them.
        cache = model.get_prompt(batch_size=batch * _expansion(model, kwargs))
        sequences = base.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
    else:
        embeds = model.get_input_embeddings()(input_ids)
        virtual = model.get_prompt(batch_size=batch).to(embeds.dtype)  # (batch, virtual tokens, hidden)
        sequences = base.generate(input_ids=ids, inputs_embeds=torch.cat([virtual, embeds], dim=1), attention_mask=mask, **kwargs)
    return sequences[:, n_virtual:]


def decodes_alone(model) -> bool:
    """Whether `decode_ids` can run `model`: no virtual-token adapter (those need `generate_ids`) and no weights
    sharded over processes (DeepSpeed ZeRO-3, FSDP: every process must run as many forward passes as the others,
    which model.generate keeps with synced_gpus and decode_ids, stopping when its own rows end, would not)."""
    import torch.distributed as dist
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    sharded = (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model)) and dist.is_available() \
        and dist.is_initialized() and dist.get_world_size() > 1
    return virtual_token_method(model) is None and not sharded


def preallocated_cache(capacity: int):
    """A KV cache that writes each step's keys and values into buffers of `capacity` positions allocated once
    (per layer, at the prefill), instead of transformers' DynamicCache, which concatenates the whole cache into new
    memory at every step of every layer (torch.cat: the largest entry when profiling greedy decoding on the default
    model). The summary's 128 greedy replies x 96 tokens on a 2-core AVX2 CPU: 1.19x faster, the same replies
    (`bench/summary_cost.py --groups cache`). The attention reads views of the written part, the same values, so the
    ids are the same up to float rounding."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """keys, values: (batch, kv_heads, capacity, head_dim) buffers; the first `length` positions are written."""

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            batch, heads, _, dim = key_states.shape
            self.device, self.length = key_states.device, 0
            self.key_buffer = key_states.new_empty(batch, heads, capacity, dim)
            self.value_buffer = value_states.new_empty(batch, value_states.shape[1], capacity, value_states.shape[-1])
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.length, self.length + key_states.shape[-2]
            if end > capacity:
                raise ValueError(f"preallocated_cache: {end} positions do not fit its capacity of {capacity}")
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("preallocated_cache: decode_ids never crops")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("preallocated_cache: decode_ids never repeats rows")

    return Cache(layer_class_to_replicate=PreallocatedLayer)


@torch.no_grad()
def decode_ids(model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, eos_token_id: int,
               pad_token_id: int, pick: Callable[[Tensor, Tensor], Tensor] | None = None, preallocate: bool = True) -> Tensor:
    """Decoding that stops computing a row once it has written EOS: each step runs only the rows still writing
    (model.generate runs every row until the last one ends; on the default model ~1/4 of a trained policy's
    row-steps come after its EOS). With the default `pick` (argmax) the ids are `model.generate(do_sample=False,
    num_beams=1)`'s with no logits processors, up to float rounding of the smaller batches; a sampler whose draws are
    per row (align.rl.ppo.rollout.GumbelSampler.pick) gives what generate gives with it as its logits processor. Not
    for virtual-token adapters or weights sharded over processes (`decodes_alone`).

    Args:
        input_ids: (batch, prompt_len) left-padded prompts.
        attention_mask: (batch, prompt_len), 1 on real tokens.
        pick: (logits (rows, vocab) float32, rows (rows,) indices into the batch) -> (rows,) next tokens.
        preallocate: keep the KV cache in buffers allocated once (`preallocated_cache`); false = transformers'
            DynamicCache, which copies the whole cache at every step (the path before, for side-by-side benchmarks).

    Returns:
        (batch, prompt_len + n) int64, n <= max_new_tokens the longest reply: each row's prompt, its reply up to and
        including its EOS, then pad_token_id, as generate returns them.
    """
    from align.evaluation.logprobs import left_padded_positions

    if not decodes_alone(model):
        raise ValueError("decode_ids: a virtual-token adapter or sharded weights need generate_ids (see decodes_alone)")
    pick = pick or (lambda logits, rows: logits.argmax(-1))
    batch, device = input_ids.shape[0], input_ids.device
    new = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    cache = preallocated_cache(input_ids.shape[1] + max_new_tokens) if preallocate else None
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=left_padded_positions(attention_mask),
                cache=cache, use_cache=True, logits_to_keep=1)
    cache, mask = out.cache, attention_mask  # transformers 5: the KV cache (past_key_values before)
    positions = attention_mask.sum(-1)  # (rows,) the next token's position in each row
    rows = torch.arange(batch, device=device)  # the rows still writing, as indices into the batch
    written = 0
    for step in range(max_new_tokens):
        token = pick(out.logits[:, -1].float(), rows)  # (rows,)
        new[rows, step] = token
        written = step + 1
        going = token != eos_token_id
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # drop the rows that ended, from the cache too
            keep = going.nonzero().squeeze(-1)
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache, use_cache=True)
        positions = positions + 1
    return torch.cat([input_ids, new[:, :written]], dim=1)


def _expansion(model, kwargs: dict) -> int:
    """How many rows generate makes of each prompt: its beams, else its returned sequences."""
    config = kwargs.get("generation_config") or model.generation_config
    beams = int(kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1)
    return beams if beams > 1 else int(kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1)


MERGEABLE = ("lora", "dora", "ia3")  # weight updates peft can fold into the base weights


MERGE_DTYPES = (torch.float32, torch.bfloat16)  # base weights a merge keeps as faithful as the unmerged model


def adapter_merges_faithfully(model) -> bool:
    """Whether `merged_adapter` merges: an enabled LoRA/DoRA/IA3 adapter whose base layers hold plain float32 or
    bf16 weights. bf16 too: many entries of the update are below bf16's rounding step, but the merged bf16 model is as
    close to the float32 adapter as the unmerged bf16 model is (held-out reply log-probs of a trained main-job adapter,
    README's performance notes; tests/unit/models/test_generation.py checks it on logits). fp16 is left alone (not
    measured), and so are quantized or sharded weights (bitsandbytes, FSDP, ZeRO-3: not a plain matrix)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from align.models.loading import adapter_method

    if adapter_method(model) not in MERGEABLE or getattr(model, "_adapters_disabled", False):
        return False
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or any(m.merged for m in layers):
        return False
    for layer in layers:
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if (type(base) is not torch.nn.Linear or weight is None or weight.dtype not in MERGE_DTYPES
                or tuple(weight.shape) != (base.out_features, base.in_features)):
            return False
    return True


class merged_adapter:
    """`with merged_adapter(model):` runs inference with the adapter's update folded into the base weights (one
    matmul per linear layer instead of the base's plus the adapter's two: generation on the default model ~1.3x
    faster on a CPU, bench/summary_cost.py), and puts the base weights back bit for bit on exit (a copy is kept, in
    host memory: unmerging by subtraction would round them). A model `adapter_merges_faithfully` refuses is used as it
    is. The merged model computes W' x with W' = W + scale B A rounded once to the weights' dtype, where the adapter
    computes W x + scale B (A x): the same function up to that dtype's rounding, not bit for bit."""

    def __init__(self, model):
        self.model = model
        self.saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @property
    def merged(self) -> bool:
        """Whether the adapter is folded into the weights now (inside the `with`, and adapter_merges_faithfully)."""
        return bool(self.saved)

    def __enter__(self):
        if not adapter_merges_faithfully(self.model):
            return self.model
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in self.model.modules():
            if isinstance(layer, BaseTunerLayer):
                base = layer.get_base_layer()
                # in host memory: on a GPU the copies would otherwise double the adapted weights' footprint
                self.saved += [(p, p.detach().to("cpu", copy=True)) for p in (base.weight, base.bias) if p is not None]
        self.model.merge_adapter()
        return self.model

    def __exit__(self, *exc) -> None:
        if self.saved:
            import warnings

            with warnings.catch_warnings():  # IA3 warns that unmerging by division is inexact: the copies are exact
                warnings.filterwarnings("ignore", message="Unmerge result can be inaccurate")
                self.model.unmerge_adapter()  # peft's bookkeeping (merged flags); the weights come from the copies
            with torch.no_grad():
                for param, original in self.saved:
                    param.copy_(original)
            self.saved = []


class own_forward:
    """`with own_forward(model):` inference through the model's own forward, without the mixed-precision wrapper
    that accelerate's prepare_model leaves on it after training (a Trainer with bf16=True or fp16=True: every forward
    under autocast, its outputs copied to float32; accelerate keeps the unwrapped one as `_original_forward`). The
    summary before training runs the model's own forward; through the wrapper the one after it ran along another
    path (autocast's casts, a float32 copy of every logit, packed_linear_weights stepping aside under autocast), not
    computed as the "before" was (a float32 reward head ran in bf16: tests/unit/trainers/test_reward_fast.py) and
    slower: the main job's summary after training 126.3 s against 102.9 s before it, 105.4 against 101.9 s with this
    (bench/results/after_training_autocast_amd_bf16/). A model without the wrapper is used as it is; the wrapper is
    put back on exit."""

    def __init__(self, model):
        self.model = model
        self.wrapper = None

    def __enter__(self):
        own = vars(self.model).get("_original_forward")
        if own is not None and "forward" in vars(self.model):
            self.wrapper = vars(self.model)["forward"]
            self.model.forward = own
        return self.model

    def __exit__(self, *exc) -> None:
        if self.wrapper is not None:
            self.model.forward, self.wrapper = self.wrapper, None


def packs_bf16_weights() -> bool:
    """Whether `packed_linear_weights` packs anything on this machine: torch built with oneDNN, and a CPU on
    which oneDNN computes bf16 matmuls (avx512_bf16/AMX and the like), the path torch's own bf16 linear takes."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packable(module: torch.nn.Module) -> bool:
    """A plain bf16 nn.Linear on the CPU whose forward nobody has replaced (not a quantized, sharded, offloaded or
    already packed layer)."""
    if type(module) is not torch.nn.Linear:
        return False
    weight, bias = module.weight, module.bias
    return (type(weight) is torch.nn.Parameter and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16 and tuple(weight.shape) == (module.out_features, module.in_features)
            and (bias is None or (type(bias) is torch.nn.Parameter and bias.dtype == torch.bfloat16))
            and "forward" not in vars(module) and not hasattr(module, "_hf_hook"))


def _packed_forward(module: torch.nn.Linear, packed: Tensor, version: int, x: Tensor) -> Tensor:
    """module(x) through the weight prepacked for oneDNN; the plain forward wherever that could differ: with
    gradients on, under autocast, for an input of another dtype or device, or once the weight has changed."""
    if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.bfloat16
            or x.device.type != "cpu" or module.weight._version != version):
        return torch.nn.Linear.forward(module, x)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


class packed_linear_weights:
    """`with packed_linear_weights(model):` no-grad inference with every bf16 linear layer's weight reordered
    once into oneDNN's blocked layout (what torch.compile's CPU freezing does), instead of torch's linear, which
    reorders it at every call. The same oneDNN kernel computes the product, so the outputs are bit for bit the
    plain layer's (tests/unit/models/test_generation.py); decoding, where every step multiplies a few rows by
    every weight, gains most: a 64-row decode step of the default model 128 -> 104 ms, its linear layers 78 -> 51 ms
    (AMD EPYC, avx512_bf16; bench/results/packed_weights_amd_bf16/). Holds one packed copy of the weights while inside.

    Layers keep their weights; each one's forward is replaced while inside and falls back to the plain one with
    gradients on, under autocast, for another input dtype, or when its weight changed after packing (a merge
    inside the `with`: merge first, then pack). Float32 weights are left alone: torch's float32 linear is MKL's,
    which oneDNN would not reproduce bit for bit, and MKL's own packed product was no faster on that CPU. Nothing is
    packed when the copy would take more than a quarter of the memory available now (MEMORY_SHARE), and nested uses
    pack each layer once."""

    MEMORY_SHARE = 0.25

    def __init__(self, model):
        self.model = model
        self.modules: list[torch.nn.Linear] = []

    def __enter__(self):
        import functools

        import psutil

        layers = [m for m in self.model.modules() if _packable(m)] if packs_bf16_weights() else []
        size = sum(m.weight.nbytes for m in layers)
        if size > self.MEMORY_SHARE * psutil.virtual_memory().available:
            return self.model
        for module in layers:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
            module.forward = functools.partial(_packed_forward, module, packed, module.weight._version)
            self.modules.append(module)
        return self.model

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            del module.forward
        self.modules = []
