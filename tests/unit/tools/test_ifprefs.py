"""The ifprefs builder (tools/build_ifprefs.py and its edits, tools/ifprefs_edits.py: edits that make a reply comply,
rejected alternatives, determinism, the generation cache) and the committed dataset files (sizes, ids, chosen >
rejected, SFT replies comply, held-out eval)."""

from __future__ import annotations

import json
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_paths import REPO

sys.path.insert(0, str(REPO / "tools"))  # the builder is a script in tools/, not in align

import build_ifprefs as ifprefs  # noqa: E402
from build_ifprefs import (  # noqa: E402
    EVAL_TEMPLATES,
    EVAL_TOPICS,
    TRAIN_TEMPLATES,
    TRAIN_TOPICS,
    BuildArgs,
    build_splits,
    eval_prompts,
    generate_replies,
)
from ifprefs_edits import (  # noqa: E402
    ABSENT_KEYWORDS,
    EVAL_EXTRA_KEYWORDS,
    Draft,
    clean_reply,
    comply,
    compatible,
    draw_types,
    rejected_candidates,
    render,
    sample_for_eval,
    sample_for_reply,
    unasked_edits,
    work_in_keyword,
)
from align.evaluation.degeneration import check_reply, unasked_formats
from align.evaluation.text_counts import count_words
from align.evaluation.verifier import TYPES, check_constraints, verify

DATA = REPO / "datasets" / "ifprefs"

# Hand-written replies in the shapes the model writes: a letter, a numbered list, a poem, plain prose.
REPLIES = [
    "Dear Grandma,\n\nI just read about bird migration and I can't stop thinking about it! Every autumn, millions "
    "of birds fly thousands of miles to warmer places. Some of them, like the Arctic tern, travel from pole to "
    "pole. They use the sun, the stars and even the Earth's magnetic field to find their way.\n\nI hope we can go "
    "birdwatching together in the spring.\n\nLove,\nEmma",
    "Composting is a simple way to turn kitchen scraps into rich soil. Here are some tips:\n\n1. Start with a bin "
    "or a pile in a shady spot.\n2. Mix green waste, like vegetable peels, with brown waste, like dry leaves.\n"
    "3. Turn the pile every week so air can reach the center.\n4. Keep it moist but not soggy.\n\nIn a few months, "
    "you will have dark, crumbly compost for your garden.",
    "The moon hangs low above the sea,\nA silver lamp for you and me.\nIt pulls the tides and lights the sand,\n"
    "And guides the sailors back to land.\nSo when you see it shining bright,\nRemember it keeps watch all night.",
    "A black hole is a place in space where gravity is so strong that nothing can escape, not even light. It forms "
    "when a massive star collapses at the end of its life. Scientists cannot see black holes directly. Instead, "
    "they study how nearby stars and gas move around them. In 2019, astronomers published the first picture of "
    "the shadow of a black hole.",
]
TOPICS = ["bird migration", "composting", "the moon", "black holes"]


def _load(name: str) -> list[dict]:
    path = DATA / f"{name}.jsonl"
    assert path.exists(), f"{path} is missing: run `python tools/build_ifprefs.py --out datasets/ifprefs --seed 0`"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- cleaning and editing


def test_clean_reply_drops_the_sentence_cut_by_the_token_limit():
    done = "Tea is a drink made from the dried leaves of a shrub. It is popular in many countries around the world."
    assert clean_reply(done + " People often drink it with", eos=False) == done
    # a reply that ended on its own keeps everything, even without a final full stop
    finished = done + " It has a long history"
    assert clean_reply(finished, eos=True) == finished
    # a list cut in its last line keeps the complete lines
    listed = ("Here are some fun facts about owls. They are birds of prey.\n- Owls can turn their heads very far\n"
              "- Owls have soft feathers for silent flight\n- Owls hunt at nig")
    assert clean_reply(listed, eos=False) == listed.rsplit("\n", 1)[0]


def test_clean_reply_rejects_short_looping_or_template_replies():
    assert clean_reply("Too short. Really.", eos=True) is None
    loop = "Bees are great and they make honey for us all. " * 6
    assert clean_reply(loop, eos=True) is None
    assert clean_reply("<<Title>> " + REPLIES[3], eos=True) is None  # would fake a title constraint


def test_draft_round_trips_a_reply_without_edits():
    for reply in REPLIES:
        assert render(Draft.from_text(reply)) == reply


def test_drop_sentence_removes_emptied_lines():
    d = Draft.from_text("One. Two.\n\nThree.")
    d.drop_sentence(2)
    assert render(d) == "One. Two."
    d.drop_sentence(0)
    assert render(d) == "Two."


def test_compatibility_rules():
    assert not compatible("capitals", ["lowercase"])
    assert not compatible("num_sections", ["lowercase"])  # SECTION is case sensitive
    assert not compatible("num_bullets", ["num_paragraphs"])
    assert not compatible("title", ["json_format"])
    assert compatible("no_comma", ["json_format"])
    assert not compatible("lowercase", ["lowercase"])


@pytest.mark.parametrize("name", sorted(TYPES))
def test_each_type_can_be_met_by_minimal_edits(name):
    """For every type, on some hand-written reply, the edits make the reply comply and at least one
    natural alternative (raw, one edit left out, untrimmed, truncated) scores lower."""
    met = 0
    for seed in range(6):
        for reply, topic in zip(REPLIES, TOPICS):
            rng = random.Random(seed)
            c = sample_for_reply(name, rng, reply, set())
            if c is None:
                continue
            check_constraints([c])
            made = comply(reply, [c], topic, rng)
            if made is None:
                continue
            draft, chosen = made
            assert verify(chosen, [c]).strict, (c, chosen)
            lower = [kind for kind, r in rejected_candidates(reply, draft, [c], topic) if not verify(r, [c]).strict]
            met += bool(lower)
    assert met >= 3, f"{name}: met with a failing alternative only {met} times"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), which=st.integers(0, len(REPLIES) - 1))
def test_variants_always_comply_and_rejected_scores_lower(seed, which):
    rng = random.Random(seed)
    made = ifprefs._variant({"topic": TOPICS[which]}, REPLIES[which], rng)
    if made is None:
        return
    constraints, draft, chosen = made
    assert 1 <= len(constraints) <= 3
    names = [c["type"] for c in constraints]
    assert all(compatible(n, names[:i]) for i, n in enumerate(names))
    assert verify(chosen, constraints).strict
    for kind, reply in rejected_candidates(REPLIES[which], draft, constraints, TOPICS[which]):
        assert kind in ifprefs.KIND_WEIGHTS and isinstance(reply, str)


def test_draw_types_gives_one_to_three_compatible_types():
    rng = random.Random(0)
    for _ in range(300):
        names = draw_types(rng)
        assert 1 <= len(names) <= 3
        assert all(compatible(n, names[:i]) for i, n in enumerate(names))


def test_eval_constraints_are_valid_for_every_type():
    rng = random.Random(0)
    for name in sorted(TYPES):
        for topic in EVAL_TOPICS[:5]:
            check_constraints([sample_for_eval(name, rng, topic)])


# ---------------------------------------------------------------- whole build on hand-written replies


def _small_build(seed: int) -> dict[str, list[dict]]:
    bases = [{"template": t, "topic": topic, "task": TRAIN_TEMPLATES[t].format(topic=topic)}
             for t, topic in zip(["letter_grandparent", "advice", "poem", "explain_beginner"], TOPICS)]
    replies = [{"reply": r, "eos": True} for r in REPLIES]
    cfg = BuildArgs(seed=seed, test_bases=1, sft_per_base=3, pairs_per_base=4)
    return build_splits(bases, replies, cfg)


def test_build_is_deterministic_and_sound():
    first, second = _small_build(0), _small_build(0)
    assert first == second
    assert first != _small_build(1)
    assert first["sft"] and first["prefs_train"] and first["prefs_test"]
    for row in first["sft"] + first["sft_test"]:
        assert verify(row["messages"][-1]["content"], row["constraints"]).strict
    for row in first["prefs_train"] + first["prefs_test"]:
        _assert_pair_prefers_chosen(row)
    # the last base is the held-out one
    assert {r["meta"]["base"] for r in first["prefs_test"]} == {3}
    assert all(r["meta"]["base"] < 3 for r in first["prefs_train"] + first["sft"])


def test_eval_prompts_are_deterministic_and_held_out():
    rows = eval_prompts(0, 50)
    assert rows == eval_prompts(0, 50)
    for row in rows:
        assert row["meta"]["template"] in EVAL_TEMPLATES and row["meta"]["topic"] in EVAL_TOPICS
        check_constraints(row["constraints"])
        assert row["prompt"][0]["content"].startswith(EVAL_TEMPLATES[row["meta"]["template"]].format(topic=row["meta"]["topic"])) \
            or row["prompt"][0]["content"].endswith(EVAL_TEMPLATES[row["meta"]["template"]].format(topic=row["meta"]["topic"]))


def test_template_and_topic_lists_are_disjoint():
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert not set(TRAIN_TEMPLATES.values()) & set(EVAL_TEMPLATES.values())
    assert not set(TRAIN_TOPICS) & set(EVAL_TOPICS)
    assert len(set(TRAIN_TOPICS)) == len(TRAIN_TOPICS) and len(set(EVAL_TOPICS)) == len(EVAL_TOPICS)


# ---------------------------------------------------------------- generation cache (tiny model)


def test_generation_is_cached_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    prompts = [[{"role": "user", "content": f"Say something about {t}."}] for t in ("tea", "owls", "snow")]
    cache = tmp_path / "gen.jsonl"
    kwargs = dict(model_name=tiny_model_dir, temperature=0.7, max_new_tokens=4, seed=0, batch_size=2, cache_path=cache,
                  log=lambda m: None)
    first = generate_replies(prompts, **kwargs)
    assert len(first) == 3 and all(isinstance(r["reply"], str) and r["n_tokens"] <= 4 for r in first)
    assert len(cache.read_text().splitlines()) == 3

    def no_model(*args, **kwargs):
        raise AssertionError("a fully cached call must not load the model")

    monkeypatch.setattr(ifprefs, "load_generator", no_model)
    assert generate_replies(prompts, **kwargs) == first
    # a lost batch is regenerated with the same seed: the same replies come back
    monkeypatch.undo()
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:2]))
    assert [r["reply"] for r in generate_replies(prompts, **kwargs)] == [r["reply"] for r in first]


# ---------------------------------------------------------------- the committed dataset files


SPLITS = ("sft", "sft_test", "prefs_train", "prefs_test", "eval")
MINIMUMS = {"sft": 2000, "prefs_train": 3000, "prefs_test": 300, "eval": 300, "sft_test": 100}


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: _load(name) for name in SPLITS}


def test_sizes_meet_the_minimums_and_the_set_is_small(data):
    for name, minimum in MINIMUMS.items():
        assert len(data[name]) >= minimum, (name, len(data[name]))
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 10 * 1024 * 1024, f"{total / 1e6:.1f} MB"
    assert not (DATA.parent / "__init__.py").exists()  # it would shadow the Hugging Face datasets package


def test_ids_are_unique(data):
    ids = [row["id"] for rows in data.values() for row in rows]
    assert len(ids) == len(set(ids))


def _assert_pair_prefers_chosen(row: dict) -> None:
    """The verifier scores chosen above rejected; or, for a pair rejecting an unasked format (add_unasked_pairs),
    both meet every constraint, rejected is text, and only rejected has a format nobody asked for, the one named."""
    where = row.get("id", row["meta"])
    chosen_text, rejected_text = row["chosen"][0]["content"], row["rejected"][0]["content"]
    chosen = verify(chosen_text, row["constraints"]).score
    rejected = verify(rejected_text, row["constraints"]).score
    assert row["meta"]["chosen_score"] == chosen and row["meta"]["rejected_score"] == rejected, where
    if row["meta"]["kind"] != "unasked_edit":
        assert chosen > rejected, where
        assert row["meta"]["kind"] in ifprefs.KIND_WEIGHTS, where
        return
    assert chosen == rejected == 1.0, where
    assert not unasked_formats(chosen_text, row["constraints"]), where
    assert row["meta"]["unasked_format"] in unasked_formats(rejected_text, row["constraints"]), where
    assert not check_reply(rejected_text, row["prompt"], row["constraints"]).degenerate, where


def test_every_test_pair_and_every_train_pair_ranks_chosen_higher(data):
    for name in ("prefs_test", "prefs_train"):
        for row in data[name]:
            _assert_pair_prefers_chosen(row)


def test_unasked_edits_add_one_format_nobody_asked_for():
    rng = random.Random(0)
    for reply, topic in zip(REPLIES, TOPICS):
        edits = unasked_edits(reply, [{"type": "no_comma"}], topic, rng)
        names = {name for name, _ in edits}
        assert {"<<title>>", "postscript", "placeholders", "quoted reply", "JSON", "all capitals"} <= names
        for name, edited in edits:
            assert name in unasked_formats(edited, [{"type": "no_comma"}]), name
            assert reply.split()[0].lower() in edited.lower(), name  # the reply is kept, the format added
        # a format the prompt asks for is never offered; dividers and sections only re-flow plain prose
        asked = unasked_edits(reply, [{"type": "postscript", "postscript_marker": "P.S."}, {"type": "title"}], topic, rng)
        assert not {"postscript", "<<title>>"} & {name for name, _ in asked}
    assert "*** dividers" in {n for n, _ in unasked_edits(REPLIES[3], [], TOPICS[3], rng)}
    assert "*** dividers" not in {n for n, _ in unasked_edits(REPLIES[1], [], TOPICS[1], rng)}  # a numbered list


def test_unasked_lines_keep_the_asked_case_end_phrase_and_quotes():
    """A placeholder line or a P.S. nobody asked for goes in the reply's asked-for case, before its end phrase and
    inside its quotes, so the reply still meets every constraint: the one difference from the chosen reply is the format."""
    constraints = [{"type": "lowercase"}, {"type": "end_phrase", "end_phrase": "Any other questions?"}, {"type": "quotation"}]
    chosen = '"the moon hangs low. it lights the sea.\n\nany other questions?"'
    assert verify(chosen, constraints).strict
    edits = dict(unasked_edits(chosen, constraints, "the moon", random.Random(0)))
    for name in ("placeholders", "postscript", "<<title>>"):  # (a lowercase "p.s." is not flagged: the builder skips it)
        assert verify(edits[name], constraints).strict, name
        if name == "postscript":
            continue
        assert unasked_formats(edits[name], constraints) == [name], name
    assert edits["placeholders"].startswith('"the moon hangs low.') and edits["placeholders"].endswith('\n\nany other questions?"')
    assert "quoted reply" not in edits and "all capitals" not in edits


def test_add_unasked_pairs_appends_siblings_once():
    splits = _small_build(0)
    before = {name: [dict(r, meta=dict(r["meta"])) for r in splits[name]] for name in ("prefs_train", "prefs_test")}
    siblings = [r for name in before for r in splits[name] if r["meta"]["kind"] == "unasked_edit"]
    assert siblings, "the small build has pairs rejecting an unasked format"
    for row in siblings:
        source = next(r for r in splits["prefs_train"] + splits["prefs_test"]
                      if r["meta"].get("unasked_sibling") and r["chosen"] == row["chosen"] and r["prompt"] == row["prompt"])
        assert source["meta"]["kind"] != "unasked_edit"
    assert ifprefs.add_unasked_pairs(splits) == {"prefs_train": 0, "prefs_test": 0}  # a second pass adds nothing
    assert {name: splits[name] for name in before} == before


def test_every_sft_reply_meets_all_its_constraints(data):
    for row in data["sft"] + data["sft_test"]:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert verify(row["messages"][1]["content"], row["constraints"]).strict, row["id"]


def test_eval_templates_and_topics_never_occur_in_training(data):
    train_rows = data["sft"] + data["sft_test"] + data["prefs_train"] + data["prefs_test"]
    train_templates = {r["meta"]["template"] for r in train_rows}
    train_topics = {r["meta"]["topic"] for r in train_rows}
    assert train_templates <= set(TRAIN_TEMPLATES) and train_topics <= set(TRAIN_TOPICS)
    for row in data["eval"]:
        assert row["meta"]["template"] in EVAL_TEMPLATES and row["meta"]["topic"] in EVAL_TOPICS
    # and by text: no eval task sentence appears in any training prompt
    eval_tasks = {EVAL_TEMPLATES[r["meta"]["template"]].format(topic=r["meta"]["topic"]) for r in data["eval"]}
    train_texts = [(r.get("messages") or r.get("prompt"))[0]["content"] for r in train_rows]
    assert not any(task in text for text in train_texts for task in eval_tasks)


def test_held_out_pairs_come_from_held_out_base_prompts(data):
    train_bases = {(r["meta"]["template"], r["meta"]["topic"]) for r in data["prefs_train"] + data["sft"]}
    test_bases = {(r["meta"]["template"], r["meta"]["topic"]) for r in data["prefs_test"] + data["sft_test"]}
    assert not train_bases & test_bases


def test_every_constraint_is_valid_and_prompts_have_one_to_three(data):
    for rows in data.values():
        for row in rows:
            assert 1 <= len(row["constraints"]) <= 3
            check_constraints(row["constraints"], row["id"])


def test_replies_are_short(data):
    replies = [r["messages"][1]["content"] for r in data["sft"]]
    assert max(count_words(t) for t in replies) < 200


def test_the_splits_load_through_the_data_layer():
    from align.data.load import load_preferences, load_prompts, load_sft

    pairs = load_preferences("ifprefs:prefs_test")
    assert pairs and all(p.constraints for p in pairs)
    assert load_sft("ifprefs:sft", max_rows=50)
    prompts = load_prompts("ifprefs:eval")
    assert len(prompts) >= 300 and all(p.constraints for p in prompts)


def test_no_target_reply_is_degenerate_and_the_card_counts_match(data):
    """Every SFT reply and chosen reply passes align.evaluation.degeneration (drop_degenerate ran on the shipped
    files); stats.json records what was dropped: 2,484 - 96 = 2,388 SFT rows, 171 - 9 = 162 held-out SFT rows,
    3,273 - 124 = 3,149 pairs, 449 - 25 = 424 held-out pairs (35 and 43 by the first rules, 4, 2 and 2 more when the
    no-answer rule came, 2 and 1 more when it came to want 4 words of the reply's own, 6 pairs more when the answer
    became the text before a postscript, 55, 9, 72 and 23 when an empty list item became degenerate); then 698 and 107
    pairs rejecting a format nobody asked for were added (add_unasked_pairs), and 196 and 24 SFT rows whose reply
    uses a format nobody asked for were dropped (drop_unasked): 2,192 and 138 SFT rows; when a sentence of 5 words
    or more written twice became degenerate (December 6), 4 more SFT rows and 1 pair, all from one base reply that
    writes "The Future We've Already Built" twice: 2,188 SFT rows and 3,846 pairs."""
    from align.evaluation.degeneration import check_reply

    for name in ("sft", "sft_test", "prefs_train", "prefs_test"):
        for row in data[name]:
            prompt, reply = ifprefs.target_reply(row)
            assert not check_reply(reply, prompt, row["constraints"]).degenerate, row["id"]
    stats = json.loads((DATA / "meta" / "stats.json").read_text())
    assert stats["dropped_degenerate"] == {"sft": 100, "sft_test": 9, "prefs_train": 125, "prefs_test": 25}
    assert {k: len(v) for k, v in data.items()} == stats["sizes"]
    assert stats["dropped_unasked"] == {"sft": 196, "sft_test": 24}
    assert (len(data["sft"]), len(data["sft_test"]), len(data["prefs_train"]), len(data["prefs_test"])) == (
        2484 - 100 - 196, 171 - 9 - 24, 3273 - 125 + 698, 449 - 25 + 107)
    for name in ifprefs.SFT_SPLITS:
        assert not any(unasked_formats(ifprefs.target_reply(r)[1], r["constraints"]) for r in data[name]), name
    assert sum(stats["unasked_formats_rejected"]["prefs_train"].values()) == 698


def test_drop_degenerate_keeps_ordinary_rows_and_renumbers():
    looping = "In every corner, a message left. " + "A message left, a message left. " * 8
    ordinary = "Bird migration is a long journey. Many birds fly south each autumn and return in spring."
    user = [{"role": "user", "content": "Write a short poem about street art."}]
    sft = [{"messages": user + [{"role": "assistant", "content": reply}], "constraints": [{"type": "no_comma"}], "meta": {}}
           for reply in (ordinary, looping, ordinary)]
    pairs = [{"prompt": user, "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}],
              "constraints": [{"type": "no_comma"}], "meta": {}} for c, r in ((looping, ordinary), (ordinary, looping))]
    splits = {"sft": sft, "sft_test": [], "prefs_train": pairs, "prefs_test": []}
    assert ifprefs.drop_degenerate(splits) == {"sft": 1, "sft_test": 0, "prefs_train": 1, "prefs_test": 0}
    ifprefs.number_rows(splits)
    assert [r["id"] for r in splits["sft"]] == ["ifprefs-sft-00000", "ifprefs-sft-00001"]
    # a degenerate rejected reply is what a rejected reply is for: the pair stays
    assert splits["prefs_train"][0]["rejected"][0]["content"] == looping


def test_drop_unasked_drops_sft_rows_with_a_format_nobody_asked_for_and_keeps_pairs():
    letter = "Dear [client's name],\n\nThe yoga retreat starts on Monday. Bring a mat and water."
    plain = "The yoga retreat starts on Monday. Bring a mat and water."
    user = [{"role": "user", "content": "Write a short newsletter update about yoga."}]
    def sft_row(reply, types):
        return {"messages": user + [{"role": "assistant", "content": reply}], "constraints": [{"type": t} for t in types], "meta": {}}
    sft = [sft_row(letter, ["no_comma"]), sft_row(plain, ["no_comma"]), sft_row(letter, ["num_placeholders"])]
    pair = {"prompt": user, "chosen": [{"role": "assistant", "content": letter}], "rejected": [{"role": "assistant", "content": plain}],
            "constraints": [{"type": "no_comma"}], "meta": {}}
    splits = {"sft": sft, "sft_test": [sft_row(letter, ["title"])], "prefs_train": [pair], "prefs_test": []}
    assert ifprefs.drop_unasked(splits) == {"sft": 1, "sft_test": 1}
    # the unasked placeholder goes; a placeholder the prompt asked for stays, and so does the pair
    assert [r["messages"][-1]["content"] for r in splits["sft"]] == [plain, letter]
    assert splits["sft_test"] == [] and splits["prefs_train"] == [pair]


def test_work_in_keyword_follows_the_first_sentence_of_prose_in_the_reply_case():
    sentence = ABSENT_KEYWORDS["patience"]
    letter = "Dear Grandma,\n\nI hope you are well. It is sunny here!\n\nLove,\nSam"
    assert work_in_keyword(letter, sentence, []) == (
        "Dear Grandma,\n\nI hope you are well. A little patience goes a long way here. It is sunny here!\n\nLove,\nSam")
    assert "well. a little patience goes" in work_in_keyword(letter.lower(), sentence, [{"type": "lowercase"}])
    assert "WELL. A LITTLE PATIENCE GOES" in work_in_keyword(letter.upper(), sentence, [{"type": "capitals"}])
    # titles, section markers, list items and a P.S. are not prose; the sentence goes after the first line that is
    sections = "<<Bees>>\nSECTION 1\n* Bees fly. Far.\nBees make honey. They dance.\nP.S. Bye."
    assert work_in_keyword(sections, "X y z.", []) == "<<Bees>>\nSECTION 1\n* Bees fly. Far.\nBees make honey. X y z. They dance.\nP.S. Bye."
    assert work_in_keyword('{"reply": "Bees make honey."}', "X y z.", [{"type": "json_format"}]) is None
    assert work_in_keyword("* one\n* two", "X y z.", []) is None


def test_absent_keywords_are_not_eval_words_and_their_sentences_carry_them_without_commas():
    eval_words = set(EVAL_EXTRA_KEYWORDS) | {w for topic in EVAL_TOPICS for w in topic.lower().split() if len(w) > 3}
    for word, sentence in ABSENT_KEYWORDS.items():
        assert word in sentence.lower() and "," not in sentence, word
        assert not any(word in e or e in word for e in eval_words), word


def test_absent_keyword_rows_ask_for_a_word_only_the_target_reply_has(data):
    """tools/build_ifprefs.py absent_keywords: the rows reworked to ask for a word their reply lacked name it in
    the instruction, the target reply works it in (and meets every constraint, test above), a pair's rejected reply
    lacks it; stats.json counts them."""
    counts = {}
    for name in ("sft", "sft_test", "prefs_train", "prefs_test"):
        counts[name] = 0
        for row in data[name]:
            word = row["meta"].get("absent_keyword")
            if word is None:
                continue
            counts[name] += 1
            prompt, reply = ifprefs.target_reply(row)
            keywords = next(c["keywords"] for c in row["constraints"] if c["type"] == "include_keywords")
            assert word in keywords and f'"{word}"' in prompt[-1]["content"] and ABSENT_KEYWORDS[word].lower() in reply.lower(), row["id"]
            if "rejected" in row and row["meta"]["kind"] != "unasked_edit":  # that one is the chosen reply plus a format
                assert word not in row["rejected"][-1]["content"].lower(), row["id"]
    assert counts == json.loads((DATA / "meta" / "stats.json").read_text())["absent_keyword_rows"]
    assert counts["sft"] > 100 and counts["prefs_train"] > 100
