"""Evaluate one policy: generate replies to a fixed prompt set with stated sampling settings, score every
reply, and write every generation and every score as JSON lines, so that no number downstream (the
comparison report) is unverifiable.

    align eval outputs/dpo --max_prompts 50 --reward_model outputs/reward
    align eval base --modes greedy                              # the untrained default model
    python eval/evaluate.py outputs/dpo                         # the same command, as a script in a checkout

    from align.evaluation.args import EvalArgs
    from align.evaluation.run import evaluate
    summary = evaluate("outputs/dpo", EvalArgs(max_prompts=50))

What is evaluated (the policy) and against what (its reference, for KL and DPO's implicit reward):

    base or a model directory   the model itself; it is its own reference (KL = 0, implicit reward = 0)
    a run with a LoRA adapter   the adapter on its base; the reference is the base with the adapter disabled
    a run with a merged model   the full model; the reference is --ref_model, else the run's
                                config.yaml model_name_or_path (without either, KL is not computed)

Written to OUT (default RUN/eval; for `base`, outputs/base/eval):

    generations.jsonl  one line per (prompt, sampling mode): prompt id and messages, the reply, mode, seed,
                       temperature, the mode's generation settings ("generation"), coherent_strict (the headline: strict pass AND not degenerate),
                       degenerate and its reasons (align.evaluation.degeneration), unasked_format(s) (formats no
                       constraint asked for: align.evaluation.degeneration.unasked_formats), the verifier's per-constraint
                       results, score and strict pass, the reward-model score, length in tokens and words, whether it ended with EOS,
                       distinct-1/2, the share of repeated 4-grams, whether it loops to the token limit, and the
                       per-sequence KL estimates
    prefs.jsonl        one line per held-out preference pair: reward-model scores of chosen and rejected,
                       policy and reference log-probs of both, and DPO's implicit rewards
    ppl.jsonl          one line per held-out SFT reply: its token count and summed negative log-likelihood
    summary.json       the settings (what must match for two evaluations to be compared), the prompt
                       fingerprint, the mean of every metric, timing and peak memory

KL(policy || reference) is estimated on the policy's own samples (mode "sample") as the per-sequence sum
over response tokens of k1 = log p - log p_ref (unbiased) and of k3 = (r - 1) - log r with
r = p_ref / p (unbiased, never negative) [Schulman20, see align.ops.kl]. With the default sampling
(temperature 1, no top-p, no top-k) the samples are drawn from the policy itself, so this is the KL of the
RLHF objective. With another temperature both models' logits are divided by it, so it is the KL between
the tempered distributions that were sampled. Greedy replies are not samples of the policy; they carry no
KL.

Repetition follows Welleck et al. 2019 ("Neural Text Generation with Unlikelihood Training",
arXiv:1908.04319): distinct-n is the number of unique n-grams over the number of n-grams of one reply,
and the repeated 4-gram share (their seq-rep-4) is 1 - distinct-4. Words are lower-cased whitespace
tokens, so the numbers do not depend on the policy's tokenizer. A reply loops to the limit when it did not
end with EOS within max_new_tokens AND align.evaluation.degeneration finds it degenerate: the failure the generation
controls (--repetition_penalty, --no_repeat_ngram_size, --num_beams, sampling) are meant to change.

Generation controls: each mode generates with one `GenerationSettings` record (`settings_for`), written
into every generations.jsonl row ("generation") and each mode's summary block, so every number says how
its replies were generated. Greedy mode takes repetition_penalty, no_repeat_ngram_size and num_beams (beam
search when > 1); sample mode takes temperature, top_p, top_k, repetition_penalty and no_repeat_ngram_size.
bench/generation_settings.py evaluates one model under a list of settings and tabulates the repetition.

The package, by concern: args.py (EvalArgs, what must match to compare), policy.py (loading the policy and its
reference), generate.py (generation settings, batched generation), logprobs.py (reply log-probs on left-padded
rows), metrics.py (per-reply text metrics, pure), run.py (one evaluation end to end and `align eval`); the
checks every score rests on: verifier.py (the built-in data's constraints, the gold check), text_counts.py (its
word, sentence and paragraph counts) and degeneration.py (the degenerate-reply check); and policy_report.py, the
cheap before/after subset a training recipe prints in its summary.
"""
