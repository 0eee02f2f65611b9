"""Builder of the built-in instruction-following dataset `ifprefs` (datasets/ifprefs, see its README).

    python tools/build_ifprefs.py --out datasets/ifprefs --seed 0     # build (generates what is not cached)
    # the default model's own replies to the eval prompts, greedy and sampled, scored by the verifier:
    python tools/build_ifprefs.py --skip_build true --baseline_out datasets/ifprefs/meta/baseline.json

How it works:

1. Base prompts are everyday tasks, `TRAIN_TEMPLATES` x `TRAIN_TOPICS` (a seeded sample). The default
   model answers each once (temperature 0.7, left-padded batches); the raw replies are cached outside git
   (`--cache`), so a rebuild only regenerates what is missing.
2. Each base reply is cleaned (a reply cut by the token limit loses its unfinished sentence) and reused
   for several constraint variants: constraints are drawn so that the reply can meet them by minimal
   edits (drop sentences, lowercase, drop commas, add an end phrase, a P.S., a title, quotes, re-flow the
   sentences into bullets or paragraphs, ...). The edited reply is the SFT target and the chosen reply.
3. The rejected reply is either the raw reply (kind "raw": what the model wrote, ignoring the
   constraints) or the chosen reply with one constraint's edit left out (kind "leave_one_out"). Every pair
   is kept only if the verifier scores chosen strictly above rejected.
4. Eval prompts come from `EVAL_TEMPLATES` x `EVAL_TOPICS`, disjoint from the training ones, with
   constraints drawn without a reply.

Everything is seeded; the files are a function of the seed and the cached generations. The edits of steps 2
and 3 are tools/ifprefs_edits.py. Nothing in the `align` package imports this builder: the splits are read as data
(`ifprefs:NAME`, align.data) and scored by align.evaluation.verifier.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's align, as the bench scripts do

from align.config import arg, parse_config  # noqa: E402
from align.errors import DataError, cli_main  # noqa: E402
from align.evaluation.text_counts import count_words  # noqa: E402
from align.evaluation.verifier import phrasings, verify  # noqa: E402
from align.io import atomic_write_json, atomic_write_text  # noqa: E402
from ifprefs_edits import (ABSENT_KEYWORDS, Draft, clean_reply, comply, draw_types, rejected_candidates, sample_for_eval,  # noqa: E402
                           sample_for_reply, unasked_edits, work_in_keyword)
from align.evaluation.degeneration import check_reply, unasked_formats  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Tasks and topics. Eval templates and topics never occur in the training splits.

TRAIN_TEMPLATES: dict[str, str] = {
    "email_friend": "Write a short email to a friend about {topic}.",
    "story": "Write a short story about {topic}.",
    "explain_beginner": "Explain {topic} to a beginner.",
    "advice": "Give some practical advice about {topic}.",
    "poem": "Write a short poem about {topic}.",
    "blog_intro": "Write the opening of a blog post about {topic}.",
    "facts": "Tell me a few interesting facts about {topic}.",
    "product": "Write a product description for a beginner's guide to {topic}.",
    "assembly_speech": "Write a short speech for a school assembly about {topic}.",
    "social_post": "Write a social media post about {topic}.",
    "diary": "Write a diary entry by someone who just got interested in {topic}.",
    "summary": "Summarize the main ideas behind {topic}.",
    "newsletter": "Write a short newsletter update about {topic} for a local community group.",
    "pros_cons": "Describe the pros and cons of {topic}.",
    "letter_grandparent": "Write a letter to a grandparent about {topic}.",
    "faq": "Answer the question a beginner most often asks about {topic}.",
    "motivation": "Write a motivational message about {topic}.",
    "workshop_review": "Write a short review of a workshop on {topic}.",
    "club_invite": "Write an invitation to a club meeting about {topic}.",
    "getting_started": "Give tips for someone getting started with {topic}.",
    "dialogue": "Write a short dialogue between two friends about {topic}.",
    "thank_teacher": "Write a thank-you note to a teacher who taught you about {topic}.",
    "why_matters": "Explain why {topic} matters.",
    "kids_explain": "Explain {topic} to a ten-year-old.",
}

EVAL_TEMPLATES: dict[str, str] = {
    "cover_letter": "Write a short cover letter for a volunteer job related to {topic}.",
    "fairy_tale": "Write a fairy tale that involves {topic}.",
    "persuasive": "Write a persuasive paragraph about {topic}.",
    "news_report": "Write a short news report about {topic}.",
    "text_coworker": "Write a message to a coworker about {topic}.",
    "lesson_plan": "Outline a lesson plan for teaching {topic}.",
    "museum_plaque": "Write the text of a museum plaque about {topic}.",
    "radio_ad": "Write a radio advertisement for an event about {topic}.",
}

TRAIN_TOPICS: tuple[str, ...] = (
    "urban gardening", "baking bread", "learning a new language", "saving money", "running a marathon",
    "birdwatching", "composting", "chess", "photography", "meditation", "recycling", "home workouts",
    "camping", "beekeeping", "budget travel", "journaling", "electric cars", "solar power", "volunteering",
    "public speaking", "time management", "remote work", "cooking with kids", "houseplants", "stargazing",
    "knitting", "cycling to work", "healthy sleep", "drinking enough water", "reading more books",
    "learning to code", "woodworking", "first aid", "fishing", "hiking", "pottery", "playing the guitar",
    "swimming", "yoga", "watercolor painting", "rock climbing", "board games", "podcasting", "minimalism",
    "meal prepping", "vegetarian cooking", "brewing coffee", "caring for a puppy", "adopting a cat",
    "keeping an aquarium", "sustainable fashion", "thrift shopping", "car maintenance", "bike repair",
    "dance classes", "singing in a choir", "volcanoes", "the water cycle", "black holes", "honeybees",
    "the human heart", "rainforests", "the moon", "climate change", "ocean tides", "earthquakes",
    "dinosaurs", "the printing press", "vaccines", "photosynthesis", "the internet", "wind energy",
    "ancient Egypt", "the Olympic Games", "coral reefs", "bird migration", "the Roman Empire",
    "electricity", "glaciers", "tornadoes", "the solar system", "mushrooms", "penguins", "whales",
    "the stock market", "credit scores", "city parks", "public libraries", "farmers markets", "jazz music",
    "street art", "3D printing", "robots", "space travel", "smartphones", "video games", "online privacy",
    "strong passwords", "job interviews", "moving to a new city", "making friends as an adult", "kindness",
    "gratitude", "patience", "teamwork", "curiosity", "family traditions", "birthday parties",
    "winter holidays", "rainy days", "autumn leaves", "spring cleaning", "the first day of school",
    "retirement", "good neighbors", "small businesses", "organic farming", "trains", "lighthouses",
    "bridges", "tea", "chocolate", "the ocean", "mountains", "deserts", "rivers", "snow", "sunflowers",
    "owls", "butterflies", "the piano", "handwriting", "board game nights", "museums", "recycled art",
)

EVAL_TOPICS: tuple[str, ...] = (
    "scuba diving", "origami", "calligraphy", "sailing", "juggling", "skateboarding", "gardening on balconies",
    "ice skating", "community theater", "kite flying", "the Great Wall of China", "hurricanes", "octopuses",
    "the Amazon river", "comets", "the periodic table", "bamboo", "electric scooters", "public transport",
    "food waste", "wildfires", "tidal power", "honey", "cheese making", "pizza", "the violin", "poetry slams",
    "marathon volunteers", "lunar eclipses", "sea turtles", "wolves", "cactus care", "snowboarding",
    "recycling electronics", "water filters", "lost pets", "road trips", "farm animals", "hot air balloons",
    "puzzle games",
)

# ------------------------------------------------------------------------------------------------
# Generation with the default model, cached


@dataclass
class BuildArgs:
    out: str = arg("datasets/ifprefs", "output folder for the JSON-lines splits")
    seed: int = arg(0, "seed of every random choice (prompts, constraints, phrasings, sampling)")
    cache: str = arg(str(Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align")) / "ifprefs_generations.jsonl"),
                     "file of raw model generations (outside git); missing ones are generated and appended")
    model: str = arg("SmolLM2-135M-Instruct", "the model that writes the replies (ModelArgs.model_name_or_path)")
    n_bases: int = arg(512, "number of training base prompts (template x topic) the model answers")
    test_bases: int = arg(64, "of those, base prompts held out for prefs_test and sft_test")
    n_eval: int = arg(320, "number of eval prompts (eval templates x eval topics)")
    sft_per_base: int = arg(6, "SFT examples (constraint variants) per training base reply")
    pairs_per_base: int = arg(8, "preference pairs (constraint variants) per base reply")
    temperature: float = arg(0.7, "sampling temperature of the base replies")
    max_new_tokens: int = arg(96, "token limit of a base reply (replies cut there lose their last sentence)")
    batch_size: int = arg(64, "generation batch size (left-padded)")
    threads: int = arg(1, "torch CPU threads for generation; 1 is fastest on a shared, oversubscribed CPU")
    baseline_out: str | None = arg(None, "also generate the default model's replies to the eval prompts "
                                         "(greedy and sampled) and write their verifier scores here; none = skip")
    baseline_max_new_tokens: int = arg(128, "token limit of the baseline replies")
    skip_build: bool = arg(False, "only generate (and score the baseline); do not write the splits")
    refilter: bool = arg(False, "no generation: drop degenerate target replies from the splits already in `out` and "
                                "renumber them (what a full build now does; cheap, for data built before the check)")


def _cache_key(model: str, prompt: list[dict], temperature: float, max_new_tokens: int, seed: int) -> str:
    blob = json.dumps([model, prompt, temperature, max_new_tokens, seed], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    cache: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write: regenerate that one
                    continue
                cache[row["key"]] = row
    return cache


def load_generator(model_name: str, threads: int):
    """The model and tokenizer, fp32, eval mode, tokenizer left-padded for batched generation."""
    import torch

    from align.models.loading import ModelArgs, load_model

    # On a CPU shared by several jobs, OpenMP threads wait on each other at every small op (measured:
    # a 32x1 forward of the 135M model took 8.5 s with 2 threads on a loaded 2-core box, 0.66 s with 1).
    torch.set_num_threads(threads)
    model, tokenizer = load_model(ModelArgs(model_name_or_path=model_name, dtype="fp32", quantization="none"), lora=False)
    model.eval()
    tokenizer.padding_side = "left"
    return model, tokenizer


def generate_replies(
    prompts: Sequence[list[dict]],
    *,
    model_name: str,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    cache_path: str | os.PathLike,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Replies of the model to chat `prompts`, as {"reply", "n_tokens", "eos"}, cached in `cache_path`.

    temperature 0 means greedy. Batch i (prompts[i*batch_size:(i+1)*batch_size]) is sampled with torch
    seed `seed + i`, so a batch regenerates identically when the cache lost it. A batch whose every prompt
    is cached is skipped; new rows are appended one batch at a time, so a kill loses at most one batch.
    """
    cache_path = Path(cache_path)
    cache = _read_cache(cache_path)
    out: list[dict | None] = [None] * len(prompts)
    model = tokenizer = None
    started = time.time()
    new_tokens = 0
    for b, lo in enumerate(range(0, len(prompts), batch_size)):
        batch = list(prompts[lo:lo + batch_size])
        keys = [_cache_key(model_name, p, temperature, max_new_tokens, seed + b) for p in batch]
        if all(k in cache for k in keys):
            for i, k in enumerate(keys):
                out[lo + i] = cache[k]
            continue
        import torch

        if model is None:
            model, tokenizer = load_generator(model_name, threads)
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + b)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        rows = []
        for i, seq in enumerate(ids[:, enc["input_ids"].shape[1]:].tolist()):
            eos = tokenizer.eos_token_id in seq
            if eos:
                seq = seq[: seq.index(tokenizer.eos_token_id)]
            reply = tokenizer.decode(seq, skip_special_tokens=True)
            rows.append({"key": keys[i], "prompt": batch[i], "reply": reply, "n_tokens": len(seq), "eos": eos,
                         "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed + b, "model": model_name})
            new_tokens += len(seq)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        for i, r in enumerate(rows):
            out[lo + i] = cache[r["key"]] = r
        elapsed = time.time() - started
        log(f"generated batch {b + 1}/{-(-len(prompts) // batch_size)}: {new_tokens} new tokens in {elapsed:.0f} s "
            f"({new_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    return out  # type: ignore[return-value]


def base_prompts(seed: int, n_bases: int) -> list[dict]:
    """The training base prompts: the first `n_bases` of a seeded shuffle of all (template, topic) pairs.

    A prefix, so a smaller `n_bases` reuses the cached generations of a larger one.
    """
    combos = [(t, topic) for t in TRAIN_TEMPLATES for topic in TRAIN_TOPICS]
    if n_bases > len(combos):
        raise DataError(f"n_bases: at most {len(combos)} distinct template x topic pairs, got {n_bases}")
    random.Random(f"ifprefs-bases-{seed}").shuffle(combos)
    chosen = combos[:n_bases]
    return [{"template": t, "topic": topic, "task": TRAIN_TEMPLATES[t].format(topic=topic)} for t, topic in chosen]


# ------------------------------------------------------------------------------------------------
# Splits


LAYOUTS = ("{task} {instructions}", "{task}\n\n{instructions}", "{instructions} {task}")


def user_message(task: str, constraints: list[dict], rng: random.Random) -> tuple[str, int]:
    instructions = " ".join(rng.choice(phrasings(c)) for c in constraints)
    layout = rng.randrange(len(LAYOUTS))
    return LAYOUTS[layout].format(task=task, instructions=instructions), layout


def _variant(base: dict, raw: str, rng: random.Random, tries: int = 30) -> tuple[list[dict], Draft, str] | None:
    for _ in range(tries):
        used: set[str] = set()
        constraints = []
        for name in draw_types(rng):
            c = sample_for_reply(name, rng, raw, used)
            if c is not None:
                constraints.append(c)
        if not constraints:
            continue
        made = comply(raw, constraints, base["topic"], rng)
        if made is not None:
            return constraints, made[0], made[1]
    return None


KIND_WEIGHTS = {"raw": 2.0, "drop_edit": 1.0, "untrimmed": 1.0, "truncated": 1.0}


def build_splits(bases: list[dict], replies: list[dict], cfg: BuildArgs) -> dict[str, list[dict]]:
    """The splits: drafted, absent keywords worked in (absent_keywords), degenerate target replies dropped
    (drop_degenerate), pairs rejecting an unasked format added (add_unasked_pairs), numbered."""
    splits = draft_splits(bases, replies, cfg)
    absent_keywords(splits)
    drop_degenerate(splits)
    add_unasked_pairs(splits)
    number_rows(splits)
    return splits


def draft_splits(bases: list[dict], replies: list[dict], cfg: BuildArgs) -> dict[str, list[dict]]:
    """Every SFT row and preference pair the base replies give, in order, without ids."""
    rng = random.Random(f"ifprefs-build-{cfg.seed}")
    n_train = len(bases) - cfg.test_bases
    splits: dict[str, list[dict]] = {"sft": [], "sft_test": [], "prefs_train": [], "prefs_test": []}
    for b, (base, gen) in enumerate(zip(bases, replies)):
        raw = clean_reply(gen["reply"], gen["eos"])
        if raw is None:
            continue
        test = b >= n_train
        meta = {"template": base["template"], "topic": base["topic"], "base": b}
        n_sft = cfg.sft_per_base if not test else max(1, cfg.sft_per_base // 2)
        for _ in range(n_sft):
            made = _variant(base, raw, rng)
            if made is None:
                continue
            constraints, _, chosen = made
            content, layout = user_message(base["task"], constraints, rng)
            splits["sft_test" if test else "sft"].append({
                "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": chosen}],
                "constraints": constraints, "meta": {**meta, "layout": layout}})
        for _ in range(cfg.pairs_per_base):
            made = _variant(base, raw, rng)
            if made is None:
                continue
            constraints, draft, chosen = made
            chosen_score = verify(chosen, constraints).score
            options = []
            for kind, reply in rejected_candidates(raw, draft, constraints, base["topic"]):
                score = verify(reply, constraints).score
                if score < chosen_score and reply.strip() != chosen.strip() and reply.strip():
                    options.append((kind, reply, score))
            if not options:
                continue
            kind, rejected, rejected_score = rng.choices(options, weights=[KIND_WEIGHTS[o[0]] for o in options])[0]
            content, layout = user_message(base["task"], constraints, rng)
            splits["prefs_test" if test else "prefs_train"].append({
                "prompt": [{"role": "user", "content": content}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "constraints": constraints,
                "meta": {**meta, "layout": layout, "kind": kind, "chosen_score": chosen_score, "rejected_score": rejected_score}})
    return splits


def number_rows(splits: dict[str, list[dict]]) -> None:
    """Give every row its id, ifprefs-SPLIT-NNNNN in file order, as the first key."""
    for name, rows in splits.items():
        for i, row in enumerate(rows):
            row.pop("id", None)
            rows[i] = {"id": f"ifprefs-{name}-{i:05d}", **row}


def target_reply(row: dict) -> tuple[list[dict], str]:
    """(prompt messages, the reply a model is trained towards): an SFT row's last assistant message, a
    preference row's chosen reply."""
    if "messages" in row:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        return row["messages"][:last], row["messages"][last]["content"]
    return row["prompt"], row["chosen"][-1]["content"]


def absent_keywords(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Rework, in place, about two thirds of the rows that ask to include a keyword so that they ask for a word the
    reply lacked (ifprefs_edits.ABSENT_KEYWORDS): a third replace the keyword, a third add one (eval asks for the
    topic's word, an unrelated word, or both). The target reply gets the word's sentence (work_in_keyword) and must
    still meet every constraint and not be degenerate; a pair's rejected reply must lack the word. The instruction
    in the prompt is re-worded in the same phrasing. Which rows and words is seeded by each row's own text, so a
    row keeps its fate however the rows around it change, and a row already reworked (meta.absent_keyword) is left
    alone. Returns the rows reworked per split."""
    changed = {}
    for name in ("sft", "sft_test", "prefs_train", "prefs_test"):
        changed[name] = sum(_rework_keyword(row) for row in splits.get(name, []))
    return changed


def _rework_keyword(row: dict) -> bool:
    at = next((i for i, c in enumerate(row["constraints"]) if c["type"] == "include_keywords"), None)
    if at is None or "absent_keyword" in row["meta"]:
        return False
    prompt, reply = target_reply(row)
    rejected = row["rejected"][-1]["content"] if "rejected" in row else ""
    rng = random.Random(hashlib.sha1(json.dumps([prompt, reply]).encode("utf-8")).hexdigest())
    mode = rng.choice(("keep", "replace", "add"))
    if mode == "keep":
        return False
    old = row["constraints"][at]
    instruction = next((i for i, text in enumerate(phrasings(old)) if text in prompt[-1]["content"]), None)
    if instruction is None:
        raise DataError(f"{row.get('id', 'a row')}: none of the include_keywords phrasings of {old['keywords']} is in its prompt")
    for word in rng.sample(sorted(ABSENT_KEYWORDS), len(ABSENT_KEYWORDS)):
        if word in reply.lower() or word in rejected.lower():
            continue
        keywords = [word] if mode == "replace" else old["keywords"][:1] + [word]
        constraints = row["constraints"][:at] + [{**old, "keywords": keywords}] + row["constraints"][at + 1:]
        edited = work_in_keyword(reply, ABSENT_KEYWORDS[word], constraints)
        if edited is None:
            return False
        verdict = verify(edited, constraints)
        if not verdict.strict or check_reply(edited, prompt, constraints).degenerate:
            continue
        content = prompt[-1]["content"].replace(phrasings(old)[instruction], phrasings(constraints[at])[instruction], 1)
        row["constraints"] = constraints
        row["meta"]["absent_keyword"] = word
        if "messages" in row:
            row["messages"] = [{**prompt[-1], "content": content}, {**row["messages"][-1], "content": edited}]
        else:
            row["prompt"] = [{**prompt[-1], "content": content}]
            row["chosen"] = [{**row["chosen"][-1], "content": edited}]
            row["meta"]["chosen_score"] = verdict.score
            row["meta"]["rejected_score"] = verify(rejected, constraints).score
        return True
    return False


UNASKED_SHARE = 0.25  # of the pairs (train and test) that get a sibling whose rejected reply adds a format nobody asked for


def add_unasked_pairs(splits: dict[str, list[dict]], share: float = UNASKED_SHARE) -> dict[str, int]:
    """Append to prefs_train and prefs_test, for a seeded `share` of their pairs, a sibling pair: the same prompt and
    chosen reply, rejected = the chosen reply plus one format no constraint asks for (ifprefs_edits.unasked_edits: a
    title, a P.S., placeholders, quotes, JSON, all capitals, dividers or sections), kept only where it still meets every
    constraint and is not degenerate text, so the one thing the pair prefers is leaving out what was not asked for. The
    verifier scores both 1.0; align.evaluation.degeneration.unasked_formats tells them apart (meta.unasked_format).

    Which pairs is seeded by each pair's own prompt and chosen reply; a pair that has its sibling is marked
    (meta.unasked_sibling) and siblings (meta.kind "unasked_edit") are not used as sources, so a second pass adds
    nothing. Siblings go after the existing rows: the ids of those stay as they were. Returns the pairs added per split."""
    added = {}
    for name in ("prefs_train", "prefs_test"):
        rows = splits.get(name, [])
        new = []
        for row in rows:
            meta = row["meta"]
            if meta["kind"] == "unasked_edit" or meta.get("unasked_sibling"):
                continue
            prompt, chosen = target_reply(row)
            rng = random.Random("unasked-" + hashlib.sha1(json.dumps([prompt, chosen]).encode("utf-8")).hexdigest())
            if rng.random() >= share or unasked_formats(chosen, row["constraints"]):
                continue
            for fmt, rejected in unasked_edits(chosen, row["constraints"], meta["topic"], rng):
                if (not verify(rejected, row["constraints"]).strict or fmt not in unasked_formats(rejected, row["constraints"])
                        or check_reply(rejected, prompt, row["constraints"]).degenerate):
                    continue
                meta["unasked_sibling"] = True
                new.append({"prompt": row["prompt"], "chosen": row["chosen"],
                            "rejected": [{"role": "assistant", "content": rejected}], "constraints": row["constraints"],
                            "meta": {**{k: v for k, v in meta.items() if k != "unasked_sibling"}, "kind": "unasked_edit",
                                     "unasked_format": fmt, "rejected_score": verify(rejected, row["constraints"]).score}})
                break
        rows.extend(new)
        added[name] = len(new)
    return added


def drop_degenerate(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Drop, in place, every training row whose target reply (SFT reply, chosen reply) is degenerate text
    (align.evaluation.degeneration: a loop, a line three times, an instruction copied back): a policy imitates its
    SFT replies and DPO moves towards its chosen ones. Returns the rows dropped per split. Rejected replies
    may be degenerate; that is what they are for."""
    def target_is_degenerate(row: dict) -> bool:
        prompt, reply = target_reply(row)
        return check_reply(reply, prompt, row["constraints"]).degenerate

    return _drop_rows(splits, ("sft", "sft_test", "prefs_train", "prefs_test"), target_is_degenerate)


def _drop_rows(splits: dict[str, list[dict]], names: Sequence[str], drop: Callable[[dict], bool]) -> dict[str, int]:
    """Remove, in place, the rows of the splits `names` for which `drop` is true; the rows dropped per split."""
    dropped = {}
    for name in names:
        rows = splits.get(name, [])
        kept = [r for r in rows if not drop(r)]
        dropped[name] = len(rows) - len(kept)
        rows[:] = kept
    return dropped


SFT_SPLITS = ("sft", "sft_test")


def drop_unasked(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Drop, in place, every SFT row whose reply uses a format no constraint of its prompt asks for
    (align.evaluation.degeneration.unasked_formats: mostly a base reply's placeholder, "Dear [client's name]",
    "[Arrangement #1516]", carried into every prompt the base reply serves): SFT imitates its replies, and the pipeline's
    SFT policy wrote a placeholder nobody asked for in 47 of 320 held-out replies against the start's 16. Preference pairs
    keep theirs: a chosen reply is weighed against its rejected one, and step 10's siblings reject the unasked format.
    Returns the rows dropped per split."""
    return _drop_rows(splits, SFT_SPLITS, lambda r: bool(unasked_formats(target_reply(r)[1], r["constraints"])))


def eval_prompts(seed: int, n_eval: int) -> list[dict]:
    """Held-out prompts from eval templates and topics only, each with 1 to 3 constraints."""
    rng = random.Random(f"ifprefs-eval-{seed}")
    combos = [(t, topic) for t in EVAL_TEMPLATES for topic in EVAL_TOPICS]
    rng.shuffle(combos)
    rows = []
    for i in range(n_eval):
        template, topic = combos[i % len(combos)]
        task = EVAL_TEMPLATES[template].format(topic=topic)
        constraints = [sample_for_eval(name, rng, topic) for name in draw_types(rng)]
        content, layout = user_message(task, constraints, rng)
        rows.append({"id": f"ifprefs-eval-{i:05d}", "prompt": [{"role": "user", "content": content}],
                     "constraints": constraints, "meta": {"template": template, "topic": topic, "layout": layout}})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def absent_keyword_rows(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Rows per split that ask for a keyword their reply did not have (absent_keywords)."""
    return {name: sum("absent_keyword" in r.get("meta", {}) for r in splits[name])
            for name in ("sft", "sft_test", "prefs_train", "prefs_test") if name in splits}


def dataset_stats(splits: dict[str, list[dict]]) -> dict[str, Any]:
    from collections import Counter

    stats: dict[str, Any] = {"sizes": {k: len(v) for k, v in splits.items()}}
    for name in ("prefs_train", "prefs_test"):
        kinds = Counter(r["meta"]["kind"] for r in splits[name])
        stats[f"{name}_kinds"] = {k: round(v / max(1, len(splits[name])), 3) for k, v in sorted(kinds.items())}
        stats[f"{name}_mean_rejected_score"] = round(
            sum(r["meta"]["rejected_score"] for r in splits[name]) / max(1, len(splits[name])), 3)
    types = Counter(c["type"] for rows in splits.values() for r in rows for c in r["constraints"])
    stats["constraint_types"] = dict(sorted(types.items()))
    n_constraints = Counter(len(r["constraints"]) for rows in splits.values() for r in rows)
    stats["constraints_per_prompt"] = dict(sorted(n_constraints.items()))
    replies = [r["messages"][-1]["content"] for r in splits["sft"]]
    stats["sft_reply_words_mean"] = round(sum(count_words(t) for t in replies) / max(1, len(replies)), 1)
    stats["absent_keyword_rows"] = absent_keyword_rows(splits)
    stats["unasked_formats_rejected"] = {name: dict(sorted(Counter(r["meta"]["unasked_format"] for r in splits[name]
                                                                   if r["meta"]["kind"] == "unasked_edit").items()))
                                         for name in ("prefs_train", "prefs_test")}
    return stats


# ------------------------------------------------------------------------------------------------
# Baseline: the default model's own replies to the eval prompts


def baseline_scores(rows: list[dict], cfg: BuildArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Verifier score (mean) and strict accuracy of the default model on `rows`, greedy and sampled."""
    prompts = [r["prompt"] for r in rows]
    out: dict[str, Any] = {"model": cfg.model, "n_prompts": len(rows), "max_new_tokens": cfg.baseline_max_new_tokens}
    for mode, temperature in (("greedy", 0.0), ("sampled_t0.7", 0.7)):
        gens = generate_replies(prompts, model_name=cfg.model, temperature=temperature,
                                max_new_tokens=cfg.baseline_max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                                cache_path=cfg.cache, threads=cfg.threads, log=log)
        verdicts = [verify(g["reply"], r["constraints"]) for g, r in zip(gens, rows)]
        per_type: dict[str, list[bool]] = {}
        for r, v in zip(rows, verdicts):
            for c, ok in zip(r["constraints"], v.passed):
                per_type.setdefault(c["type"], []).append(ok)
        out[mode] = {
            "temperature": temperature,
            "mean_score": round(sum(v.score for v in verdicts) / len(verdicts), 4),
            "strict_accuracy": round(sum(v.strict for v in verdicts) / len(verdicts), 4),
            "instruction_accuracy": round(sum(sum(v.passed) for v in verdicts) / sum(len(v.passed) for v in verdicts), 4),
            "eos_rate": round(sum(g["eos"] for g in gens) / len(gens), 4),
            "mean_tokens": round(sum(g["n_tokens"] for g in gens) / len(gens), 1),
            "per_type_pass_rate": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_type.items())},
        }
    return out


@cli_main
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BuildArgs, sys.argv[1:] if argv is None else argv)
    log = lambda msg: print(f"[ifprefs] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if cfg.test_bases >= cfg.n_bases:
        raise DataError(f"test_bases: must be below n_bases ({cfg.n_bases}), got {cfg.test_bases}")
    out = Path(cfg.out)
    if cfg.refilter:
        splits = {name: [json.loads(line) for line in open(out / f"{name}.jsonl", encoding="utf-8")]
                  for name in ("sft", "sft_test", "prefs_train", "prefs_test", "eval")}
        reworked = absent_keywords(splits)
        dropped = drop_degenerate(splits)
        dropped_unasked = drop_unasked(splits)
        unasked = add_unasked_pairs(splits)
        number_rows(splits)
        for name, rows in splits.items():
            _write_jsonl(out / f"{name}.jsonl", rows)
        old_stats = json.loads((out / "meta" / "stats.json").read_text(encoding="utf-8"))
        stats = {**dataset_stats(splits), **{k: old_stats[k] for k in ("usable_base_replies", "base_prompts") if k in old_stats}}
        # totals since the build: a refilter after the check gains a rule adds to what earlier passes dropped
        for key, now in (("dropped_degenerate", dropped), ("dropped_unasked", dropped_unasked)):
            earlier = old_stats.get(key, {})
            stats[key] = {k: earlier.get(k, 0) + n for k, n in now.items()}
        atomic_write_json(out / "meta" / "stats.json", stats)
        log(f"absent keywords worked into {json.dumps(reworked)} rows; pairs rejecting an unasked format added: {json.dumps(unasked)}; "
            f"dropped degenerate target replies: {json.dumps(dropped)} (since the build: {json.dumps(stats['dropped_degenerate'])}); "
            f"SFT rows with a format nobody asked for dropped: {json.dumps(dropped_unasked)}; "
            f"now {json.dumps(stats['sizes'])}")
        return
    if not cfg.skip_build:
        bases = base_prompts(cfg.seed, cfg.n_bases)
        log(f"{len(bases)} base prompts; replies cached in {cfg.cache}")
        replies = generate_replies([[{"role": "user", "content": b["task"]}] for b in bases], model_name=cfg.model,
                                   temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                   batch_size=cfg.batch_size, cache_path=cfg.cache, threads=cfg.threads, log=log)
        splits = draft_splits(bases, replies, cfg)
        absent_keywords(splits)
        dropped = drop_degenerate(splits)
        dropped_unasked = drop_unasked(splits)
        add_unasked_pairs(splits)
        number_rows(splits)
        splits["eval"] = eval_prompts(cfg.seed, cfg.n_eval)
        for name, rows in splits.items():
            _write_jsonl(out / f"{name}.jsonl", rows)
        stats = dataset_stats(splits)
        stats["usable_base_replies"] = sum(clean_reply(g["reply"], g["eos"]) is not None for g in replies)
        stats["base_prompts"] = len(bases)
        stats["dropped_degenerate"] = dropped
        stats["dropped_unasked"] = dropped_unasked
        atomic_write_json(out / "meta" / "stats.json", stats)  # a subfolder: not a split to the data loader
        log(f"wrote {', '.join(f'{k} {v}' for k, v in stats['sizes'].items())} to {out}")
    if cfg.baseline_out:
        rows = [json.loads(line) for line in open(out / "eval.jsonl", encoding="utf-8")]
        result = baseline_scores(rows, cfg, log)
        atomic_write_json(cfg.baseline_out, result)
        log(f"baseline: {json.dumps({k: v for k, v in result.items() if k.startswith(('greedy', 'sampled'))})}")


if __name__ == "__main__":
    main()
