"""One decode step of the summary, profiled: 64 held-out prompts (the 129th to 192nd shortest), the adapter merged,
prefill then 16 greedy steps timed, then 16 more under torch.profiler, the top operators by self time with their
shapes. --packed runs inside packed_linear_weights.

    HF_HUB_OFFLINE=1 python bench/results/packed_weights_amd_bf16/decode_step_profile.py ADAPTER [--packed]
"""
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from align.data.load import load_prompts  # noqa: E402
from align.evaluation.logprobs import left_pad, left_padded_positions  # noqa: E402
from align.models.generation import merged_adapter, packed_linear_weights, preallocated_cache  # noqa: E402
from align.models.loading import load_trained  # noqa: E402

torch.set_num_threads(2)
model, tokenizer = load_trained(sys.argv[1])
encoded = sorted((tokenizer(tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"] for p in load_prompts("ifprefs:eval", max_rows=320)), key=len)
packing = packed_linear_weights(model) if "--packed" in sys.argv else contextlib.nullcontext()
with merged_adapter(model), packing, torch.no_grad():
    ids, mask = left_pad(encoded[128:192], tokenizer.pad_token_id)
    cache = preallocated_cache(ids.shape[1] + 40)
    out = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask), cache=cache,
                use_cache=True, logits_to_keep=1)
    positions = mask.sum(-1)

    def step(out, mask, positions):
        token = out.logits[:, -1].float().argmax(-1)
        mask = torch.cat([mask, mask.new_ones(len(token), 1)], dim=1)
        return model(input_ids=token[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache,
                     use_cache=True), mask, positions + 1

    started = time.perf_counter()
    for _ in range(16):
        out, mask, positions = step(out, mask, positions)
    print(f"{'packed' if '--packed' in sys.argv else 'plain'}: {(time.perf_counter() - started) / 16 * 1e3:.1f} ms a step")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(16):
            out, mask, positions = step(out, mask, positions)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
