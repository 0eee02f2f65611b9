"""What autograd saves per decoder layer and position in the recipes' bf16 training (autocast), by the saved tensor's
shape, dtype and the op that made it: a LoRA model (r 16, all linear layers, dropout 0.05 fused) of the default
model's shapes (hidden 576, intermediate 1536, 9/3 heads; random weights), 2 and 3 layers, 4 x 64 tokens; printed: the
3-layer minus the 2-layer bytes over the 256 positions.

    python bench/results/lean_activations_amd_bf16/saved_tensors_probe.py [--shared]

--shared: with align.models.lora_dropout.share_lora_inputs, as load_model gives it since c1a984f.
"""

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from align.models.lora_dropout import fuse_lora_dropout, share_lora_inputs  # noqa: E402
from align.models.swiglu import fuse_swiglu  # noqa: E402

torch.set_num_threads(2)


def saved(layers: int, shared: bool) -> collections.Counter:
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=49152, tie_word_embeddings=True, head_dim=64, num_hidden_layers=layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.05))
    fuse_lora_dropout(model)
    fuse_swiglu(model)
    if shared:
        share_lora_inputs(model)
    model.train()
    params, storages = {p.data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.data_ptr() not in params:
            storages.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), tuple(t.shape[1:]),
                                str(t.dtype).replace("torch.", ""), t.grad_fn.name() if t.grad_fn else None))
        return t

    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids).logits
    counts = collections.Counter()
    for nbytes, *key in storages.values():
        counts[tuple(key)] += nbytes
    return counts


shared = "--shared" in sys.argv
a, b = saved(2, shared), saved(3, shared)
total = 0
for key in sorted(set(a) | set(b), key=str):
    if b[key] - a[key]:
        total += b[key] - a[key]
        print(key, (b[key] - a[key]) / 256)
print(f"bytes a layer and position: {total / 256}")
