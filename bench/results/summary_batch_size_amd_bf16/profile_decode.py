"""Where a greedy decode step's time goes: 64 summary prompts, 24 new tokens, packed bf16 weights, torch profiler."""
import torch, time
from torch.profiler import profile, ProfilerActivity
from align.data.load import load_prompts
from align.evaluation.logprobs import left_pad
from align.models.generation import decode_ids, packed_linear_weights
from align.models.loading import load_model, ModelArgs
from align.rl.ppo.rollout import chat_ids
torch.set_num_threads(1)
model, tok = load_model(ModelArgs(), lora=False); model.eval()
prompts = load_prompts("ifprefs:eval")[:64]
enc = [chat_ids(tok, p.prompt) for p in prompts]  # the chat template with the generation prompt, as the summary encodes them
print("prompt tokens mean", sum(map(len, enc)) / len(enc), "max", max(map(len, enc)))
ids, mask = left_pad(enc, tok.pad_token_id)
with packed_linear_weights(model):
    decode_ids(model, ids[:8], mask[:8], 4, tok.eos_token_id, tok.pad_token_id)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter(); decode_ids(model, ids, mask, 24, tok.eos_token_id, tok.pad_token_id); print("s", time.perf_counter() - t)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
