"""Decode attention of the summary's greedy decoding (64 rows, 9 query heads over 3 key/value heads, head dim 64, bf16, keys
as views of a preallocated cache, a left-padding mask): SDPA as transformers 5 calls it against a hand-written
grouped attention. python decode_attention_bench.py"""
import torch, time
import torch.nn.functional as F
torch.set_num_threads(2); torch.manual_seed(0)
b, hq, hk, d, cap = 64, 9, 3, 64, 320
for L in (120, 250):
    kb = torch.randn(b, hk, cap, d).bfloat16(); vb = torch.randn(b, hk, cap, d).bfloat16()
    k, v = kb[:, :, :L], vb[:, :, :L]
    q = torch.randn(b, hq, 1, d).bfloat16()
    mask = torch.ones(b, 1, 1, L, dtype=torch.bool); mask[:, :, :, :10] = torch.rand(b,1,1,10) > 0.5
    def sdpa():
        kr = k[:, :, None].expand(b, hk, hq // hk, L, d).reshape(b, hq, L, d)
        vr = v[:, :, None].expand(b, hk, hq // hk, L, d).reshape(b, hq, L, d)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=d ** -0.5)
    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
    def manual():
        qg = q.view(b, hk, hq // hk, d)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * d ** -0.5   # (b, hk, g, L)
        s = s.masked_fill(~mask.view(b, 1, 1, L), float("-inf"))
        p = torch.softmax(s, -1).to(v.dtype)
        return torch.matmul(p, v).view(b, hq, 1, d)
    ref = sdpa()
    for name, fn in (("sdpa+repeat", sdpa), ("sdpa gqa", sdpa_gqa), ("manual", manual)):
        for _ in range(3): out = fn()
        t = time.perf_counter()
        for _ in range(30): out = fn()
        print(L, name, f"{(time.perf_counter()-t)/30*1000:.3f} ms", "maxdiff", (out.float()-ref.float()).abs().max().item())
print("packed as transformers 5 calls it:")
for L in (120, 250):
    kb = torch.randn(b, hk, cap, d).bfloat16(); vb = torch.randn(b, hk, cap, d).bfloat16()
    k, v = kb[:, :, :L], vb[:, :, :L]
    q = torch.randn(b, hq, 1, d).bfloat16()
    mask = torch.ones(b, 1, 1, L, dtype=torch.bool); mask[:, :, :, :10] = torch.rand(b,1,1,10) > 0.5
    qp = q.reshape(b, hk, hq // hk, d)
    def packed():
        return F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=d ** -0.5)
    def manual():
        s = torch.matmul(qp, k.transpose(-1, -2)).float() * d ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)
    def manual_math():
        return torch.ops.aten._scaled_dot_product_attention_math(qp, k, v, attn_mask=mask, scale=d ** -0.5)[0]
    ref = packed()
    for name, fn in (("packed sdpa", packed), ("manual", manual), ("aten math", manual_math)):
        for _ in range(3): out = fn()
        t = time.perf_counter()
        for _ in range(30): out = fn()
        print(L, name, f"{(time.perf_counter()-t)/30*1000:.3f} ms", "maxdiff", (out.float()-ref.float()).abs().max().item(), out.shape)
