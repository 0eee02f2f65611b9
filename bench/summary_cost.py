"""What the trained policy's summary costs, before and after issue 19's two changes, side by side in one process:

    python bench/summary_cost.py --adapter outputs/dpo/adapter --out bench/results/summary_cost_avx2

1. held-out pair log-probs: two reply_logps calls (chosen, rejected: every prompt run twice) against pair_logps
   (each prompt once, its KV cache repeated for both replies); the recipe's 64 held-out pairs, batch 16;
2. greedy generation of the summary (128 held-out prompts, 96 new tokens) three ways: model.generate over the
   prompts in their order with the adapter unmerged (the summary before issue 19), the same merged
   (align.models.generation.merged_adapter), and what align.evaluation.generate does now: merged, prompts batched
   by length, each row dropped at its EOS (align.models.generation.decode_ids); and the starting model (adapter
   disabled, as the "before" summary runs) with model.generate against decode_ids;
3. PPO's rollout sampling at its defaults (8 prompts a batch, 64 new tokens, temperature 0.7, the per-row
   GumbelSampler; the starting model, as PPO from the plain model): model.generate with the sampler as its logits
   processor (align.rl.ppo before issue 19) against decode_ids with its per-row pick: the same draws; and the
   given adapter's sampling (a trained policy's) unmerged against merged (align.rl.ppo since December 6); and
   (--groups sampling) that policy's sampling as before issue 19 (model.generate, DynamicCache, unmerged) against now
   (decode_ids, preallocated cache, merged);
4. decode_ids's KV cache (the summary's 128 greedy replies, merged, prompts in order): transformers' DynamicCache,
   which concatenates every layer's whole cache into new memory at every step, against the buffers allocated once
   (align.models.generation.preallocated_cache, the default);
5. (--groups packed) bf16 weights prepacked for oneDNN (align.models.generation.packed_linear_weights) or not: the
   trained policy's summary as the recipes make it (align.evaluation.policy_report.summarize_policy: pair
   log-probs and greedy replies, merged; the starting model's log-probs computed once beforehand, as the DPO recipe
   passes them) and PPO's sampling (merged, decode_ids); the summaries must agree in every number and reply;
6. (--groups wrapper, alone) that summary after training: the model prepared as a Trainer with bf16=True prepares
   it (accelerate's mixed-precision wrapper on its forward: autocast, outputs to float32), the summary through the
   wrapper (as before December 7, evening) against through the model's own forward (align.models.generation.own_forward).

Each is timed --repeats times, old and new alternating, on the default model with the given adapter (a trained
one: merging a zero adapter would change nothing). The JSON has every time, the medians' ratios, how far the
log-probs of the two paths differ, and how many greedy replies are identical to the first arm's (merging and
smaller batches round differently, so a near-tie may flip).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.data.load import load_preferences, load_prompts  # noqa: E402
from align.errors import cli_main  # noqa: E402
from align.evaluation.args import EvalArgs  # noqa: E402
from align.evaluation.generate import generate, settings_for  # noqa: E402
from align.evaluation.logprobs import left_pad, pair_logps, reply_logps  # noqa: E402
from align.evaluation.policy import Policy  # noqa: E402
from align.io import atomic_write_json  # noqa: E402
from align.models.generation import decode_ids, generate_ids, merged_adapter  # noqa: E402
from align.models.loading import cpu_description, load_trained  # noqa: E402


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def replies_in_batches(tokenizer, prompts: list, batch_size: int, run) -> list[tuple[str, int]]:
    """(reply, new tokens before EOS) per prompt, in their order: batches of batch_size chat-templated, left-padded
    prompts, each given to run(ids, mask, first prompt's index) -> (rows, prompt + new) ids."""
    from align.ops.responses import truncate_after_eos

    out = []
    for start in range(0, len(prompts), batch_size):
        prefixes = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(prefixes, tokenizer.pad_token_id)
        sequences = run(ids, mask, start)
        responses, response_mask, _, contains_eos = truncate_after_eos(sequences[:, ids.shape[1] :], tokenizer.eos_token_id,
                                                                       tokenizer.pad_token_id)
        for row in range(len(prefixes)):
            n = int(response_mask[row].sum()) - int(contains_eos[row])
            out.append((tokenizer.decode(responses[row, :n].tolist(), skip_special_tokens=True), n))
    return out


def generate_in_order(policy: Policy, prompts: list, cfg: EvalArgs) -> list[tuple[str, int]]:
    """The summary's replies as generated before issue 19: model.generate on batches of cfg.generate_batch_size
    prompts in their order, every row run until the batch's last one ends."""
    gen_config = settings_for("greedy", cfg).generation_config(policy.tokenizer)
    return replies_in_batches(policy.tokenizer, prompts, cfg.generate_batch_size,
                              lambda ids, mask, _: generate_ids(policy.model, ids, mask, generation_config=gen_config))


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="a trained adapter folder (e.g. outputs/dpo/adapter)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--groups", type=lambda v: v.split(","),
                        default=["logps", "generate", "start", "rollout", "cache", "sampling"],
                        help="comma-separated: which comparisons to run (logps, generate, start, rollout, cache, sampling, packed; "
                             "wrapper alone)")
    args = parser.parse_args()
    if "wrapper" in args.groups and len(args.groups) > 1:
        parser.error("--groups: wrapper prepares the model for training (a forward wrapper every arm would run): run it alone")
    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load_trained(args.adapter)
    model.eval()
    pairs = load_preferences("ifprefs:prefs_test", max_rows=args.pairs)  # the recipes' held-out pairs
    prompts_p, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    prompt_records = load_prompts("ifprefs:eval", max_rows=args.prompts)
    prompts = [p.prompt for p in prompt_records]
    cfg = EvalArgs(max_new_tokens=args.max_new_tokens, batch_size=16, modes=["greedy"])
    policy = Policy(model=model, tokenizer=tokenizer, kind="model", path=args.adapter)

    def merged(fn):
        with merged_adapter(model):
            return fn()

    def starting_model(fn):
        with model.disable_adapter():
            return fn()

    now = lambda: [(g.reply, g.length_tokens) for g in generate(policy, prompts, "greedy", cfg)]  # noqa: E731
    before = lambda: generate_in_order(policy, prompts, cfg)  # noqa: E731
    arms = {  # name: what it runs; generation arms return (reply, new tokens) per prompt
        "logps_twice": lambda: (reply_logps(model, tokenizer, prompts_p, chosen, 16),
                                reply_logps(model, tokenizer, prompts_p, rejected, 16)),
        "logps_pair": lambda: pair_logps(model, tokenizer, prompts_p, chosen, rejected, 16),
        "generate_unmerged": before,
        "generate_merged": lambda: merged(before),
        "generate_merged_pruned": lambda: merged(now),
        "start_generate": lambda: starting_model(before),
        "start_generate_pruned": lambda: starting_model(now),
    }
    def rollouts(pruned: bool) -> list[tuple[str, int]]:
        """PPO's sampling of every prompt, in batches of 8: (reply, new tokens before EOS)."""
        from transformers import LogitsProcessorList

        from align.rl.ppo.rollout import GumbelSampler, row_seed

        def run(ids, mask, start):
            sampler = GumbelSampler([row_seed(0, 0, start + i) for i in range(len(ids))], 0.7)
            if pruned:
                return decode_ids(model, ids, mask, 64, tokenizer.eos_token_id, tokenizer.pad_token_id, pick=sampler.pick)
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                                  max_new_tokens=64, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  logits_processor=LogitsProcessorList([sampler]))

        return replies_in_batches(tokenizer, prompts, 8, run)

    def decoded(preallocate: bool) -> list[tuple[str, int]]:
        """The trained policy's greedy replies (merged), decode_ids over batches of cfg.generate_batch_size prompts
        in their order, its KV cache preallocated or transformers' DynamicCache (concatenated every step)."""
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        run = lambda ids, mask, _: decode_ids(model, ids, mask, args.max_new_tokens, eos, pad, preallocate=preallocate)  # noqa: E731
        return merged(lambda: replies_in_batches(tokenizer, prompts, cfg.generate_batch_size, run))

    arms["cache_dynamic"] = lambda: decoded(False)
    arms["cache_preallocated"] = lambda: decoded(True)
    arms["rollout_generate"] = lambda: starting_model(lambda: rollouts(False))
    arms["rollout_pruned"] = lambda: starting_model(lambda: rollouts(True))
    arms["rollout_adapter"] = lambda: rollouts(True)  # a trained policy's sampling, the adapter unmerged
    arms["rollout_merged"] = lambda: merged(lambda: rollouts(True))  # the same, merged (align.rl.ppo now)
    arms["sampling_before"] = lambda: rollouts(False)  # that sampling before issue 19: model.generate, unmerged
    arms["sampling_now"] = arms["rollout_merged"]  # and as now: merged, decode_ids

    def packing(on: bool, fn):
        """fn() with packed_linear_weights packing (on) or a no-op (off), wherever the code under test enters it."""
        from align.models import generation

        available = generation.packs_bf16_weights
        generation.packs_bf16_weights = available if on else (lambda: False)
        try:
            return fn()
        finally:
            generation.packs_bf16_weights = available

    def summary() -> list[tuple[str, int]]:
        """The trained policy's summary as the DPO recipe makes it; its rows as (reply, new tokens), the other
        numbers kept in `summaries` to compare."""
        from align.evaluation.policy_report import summarize_policy

        out = summarize_policy(model, tokenizer, pairs, prompt_records, beta=0.1, adapter=True,
                               max_new_tokens=args.max_new_tokens, batch_size=16, start_logps=start_logps)
        summaries.append({k: v for k, v in out.items() if k != "time_s"})
        return [(row["reply"], row["length_tokens"]) for row in out["rows"]]

    summaries, start_logps = [], {}
    if {"packed", "wrapper"} & set(args.groups):  # the starting model's pair log-probs, as the recipe keeps them from its first summary
        from align.evaluation.policy_report import summarize_policy

        summarize_policy(model, tokenizer, pairs, [], beta=0.1, adapter=False, start_logps=start_logps)
    arms["packed_summaryplain"] = lambda: packing(False, summary)
    arms["packed_summary"] = lambda: packing(True, summary)
    arms["packed_samplingplain"] = arms["rollout_merged"]

    def packed_sampling():
        """PPO's sampling as align.rl.ppo.rollout runs it now: merged, then packed."""
        from align.models.generation import packed_linear_weights

        with merged_adapter(model), packed_linear_weights(model):
            return rollouts(True)

    arms["packed_sampling"] = packed_sampling

    def own_forward(on: bool, fn):
        """fn() with the summary setting accelerate's wrapper aside (on) or running through it (off)."""
        from align.models import generation

        real = generation.own_forward
        generation.own_forward = real if on else (lambda model: contextlib.nullcontext())
        try:
            return fn()
        finally:
            generation.own_forward = real

    if "wrapper" in args.groups:  # as a Trainer with bf16=True (fp16=True) leaves the model after training
        from accelerate import Accelerator

        Accelerator(mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model.dtype, "no"),
                    cpu=True).prepare_model(model)
    arms["wrapper_summarywrapped"] = lambda: own_forward(False, summary)
    arms["wrapper_summary"] = lambda: own_forward(True, summary)
    groups = set(args.groups)
    arms = {name: fn for name, fn in arms.items() if name.split("_")[0] in groups}
    times: dict[str, list[float]] = {name: [] for name in arms}
    outputs: dict = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in arms.items():
                t, outputs[name] = timed(fn)
                times[name].append(t)
    with merged_adapter(model):
        did_merge = any(getattr(m, "merged", False) for m in model.modules())
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    # (result key, the old arm, the new arm): a speed-up is old / new, measured where both ran
    comparisons = [("logps_speedup", "logps_twice", "logps_pair"),
                   ("generate_speedup_merge", "generate_unmerged", "generate_merged"),
                   ("generate_speedup_pruning", "generate_merged", "generate_merged_pruned"),
                   ("generate_speedup_total", "generate_unmerged", "generate_merged_pruned"),
                   ("start_generate_speedup_pruning", "start_generate", "start_generate_pruned"),
                   ("rollout_speedup_pruning", "rollout_generate", "rollout_pruned"),
                   ("rollout_speedup_merge", "rollout_adapter", "rollout_merged"),
                   ("sampling_speedup_total", "sampling_before", "sampling_now"),
                   ("cache_speedup_preallocated", "cache_dynamic", "cache_preallocated"),
                   ("packed_speedup_summary", "packed_summaryplain", "packed_summary"),
                   ("packed_speedup_sampling", "packed_samplingplain", "packed_sampling"),
                   ("wrapper_speedup_summary", "wrapper_summarywrapped", "wrapper_summary")]
    result = {
        "cpu": cpu_description(), "threads": args.threads, "adapter": args.adapter, "pairs": len(pairs),
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "merged": did_merge,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}, "median_seconds": median,
        **{key: round(median[old] / median[new], 2) for key, old, new in comparisons if old in median and new in median},
        "new_tokens": {k: sum(n for _, n in outputs[k]) for k in arms if not k.startswith("logps")},
        "identical_replies": {f"{new}_vs_{old}": sum(x[0] == y[0] for x, y in zip(outputs[new], outputs[old]))
                              for _, old, new in comparisons if old in outputs and new in outputs and old != "logps_twice"},
    }
    if "packed" in groups:  # every summary of either arm the same, numbers and replies
        result["packed_summaries_identical"] = all(s == summaries[0] for s in summaries)
    if "wrapper" in groups:  # autocast computes other roundings: how far the two summaries' numbers are apart
        wrapped, own = summaries[0], summaries[1]
        result["wrapper_numbers"] = {k: [wrapped[k], own[k]] for k in own if k != "rows" and isinstance(own[k], (int, float))}
    if "logps" in groups:
        old, new = outputs["logps_twice"], outputs["logps_pair"]
        result["max_logp_difference_nats"] = round(max(abs(a[0] - b[0]) for side in (0, 1) for a, b in zip(old[side], new[side])), 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary_cost.json", result)
    print(result)


if __name__ == "__main__":
    main()
