"""What a LoRA layer costs on top of its bf16 base, and whether a bit-exact reordering of PEFT's float32 tail is cheaper.

One layer of the default model's MLP width (576 -> 1536, bf16 base, float32 LoRA r=16, alpha 32), 1,536 tokens, 2
threads, eval (no dropout). Arms: the base alone; PEFT's LoRA forward (x cast to float32, lora_B(lora_A(x)) * scaling,
added to the bf16 result, cast back); the same values with the scaling and the add done in place on lora_B's output.
Forward, and forward + backward to the input and the LoRA weights; the exact variant's outputs and gradients are
checked bit-equal to PEFT's. `--bf16_arm` adds the adapter computed in bf16 (not exact) and PEFT's forward under CPU autocast to bf16 (what a bf16
Trainer runs: accelerate wraps the model's forward in autocast)."""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

torch.set_num_threads(2)
torch.manual_seed(0)
BF16_ARM = "--bf16_arm" in sys.argv  # also time the adapter computed in bf16 (not exact)


class One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(576, 1536, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        return self.proj(x)


model = get_peft_model(One(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["proj"]))
layer = model.base_model.model.proj
with torch.no_grad():
    layer.lora_B["default"].weight.normal_(0, 0.02)
model.eval()
x = torch.randn(1536, 576, dtype=torch.bfloat16, requires_grad=True)


def peft(x):
    return layer(x)


def base(x):
    return layer.base_layer(x)


def in_place(x):
    result = layer.base_layer(x)
    out = layer.lora_B["default"](layer.lora_A["default"](x.to(torch.float32)))
    out.mul_(layer.scaling["default"])
    out.add_(result)
    return out.to(result.dtype)


def bf16_adapter(x):  # not exact: the adapter's matmuls and tail in bf16 (float32 weights cast per call, as autocast does)
    result = layer.base_layer(x)
    a, b = layer.lora_A["default"].weight.to(x.dtype), layer.lora_B["default"].weight.to(x.dtype)
    return result + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * layer.scaling["default"]


def peft_autocast(x):  # PEFT's forward under CPU autocast to bf16, as accelerate runs a bf16 Trainer's forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)


def grads(fn):
    x.grad = None
    for p in model.parameters():
        p.grad = None
    y = fn(x)
    y.float().square().mean().backward()
    return y.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


ref, mine = grads(peft), grads(in_place)
assert torch.equal(ref[0], mine[0]) and torch.equal(ref[1], mine[1]) and all(torch.equal(a, b) for a, b in zip(ref[2], mine[2]))
print("in-place variant: outputs and gradients bit-equal to PEFT's", flush=True)


def timeit(fn, backward, reps=30):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        if backward:
            fn(x).float().sum().backward()
        else:
            with torch.no_grad():
                fn(x)
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


for backward in (False, True):
    for rep in range(2):
        arms = (("base", base), ("peft", peft), ("in_place", in_place)) + ((("bf16_adapter", bf16_adapter), ("peft_autocast", peft_autocast)) if BF16_ARM else ())
        row = {name: timeit(fn, backward) for name, fn in arms}
        print(f"{'fwd+bwd' if backward else 'forward'} (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
              + "; LoRA overhead " + ", ".join(f"{k} {v / row['base']:.2f}x" for k, v in row.items() if k != "base"), flush=True)
