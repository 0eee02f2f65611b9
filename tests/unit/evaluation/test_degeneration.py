"""align.evaluation.degeneration on real replies.

tests/support/data/base_replies.jsonl and base_replies_degenerate.jsonl are the greedy replies of the embedded
default model (SmolLM2-135M-Instruct, no training) to the first 80 prompts of `ifprefs:eval`, generated once
with

    python eval/evaluate.py base --modes greedy --max_prompts 80 --pref_data none --ppl_data none

(128 new tokens at most, dtype auto: bf16 on this avx512_bf16 CPU, code of commit 38c524a; strict 0.2375). Every reply was read by a
person. base_replies.jsonl keeps the 37 that are ordinary text (some cut off at the token limit, some
failing their constraints, none looping); base_replies_degenerate.jsonl keeps the 26 a reader strikes as
loops, repeated blocks or read-back instructions (`SECTION 1 / SECTION 2 / SECTION 3` cycling, `P.S.`
fifteen times, `*important*` to the token limit, "Your reply must be less than 150 words long." as the
postscript), and one that is no answer: `"Spread the love: Sea Turtles Day"` for a radio advertisement in
exactly 2 bullets (first filed as ordinary; moved when the no-answer rule was added). The other 16 were borderline (a sentence said twice, a heading repeated once) and are in
neither file.

The four kinds of issue 23 (a GRPO run on the raw verifier score) are written from the issue's
description of them, since that run's replies are not in this repository.
"""

from __future__ import annotations

import json

import pytest

from align.evaluation.degeneration import (
    COPY_MIN_WORDS, LINE_MIN_COUNT, check_reply, copied_instruction, degenerate_share, repeated_line, repeated_tail,
    asks_for_verse, before_postscript, empty_section, no_answer, repeated_sentence, repeated_title, repetition_loop,
)
from align.errors import DataError
from repo_paths import DATA


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the four kinds of issue 23 ----------------------------------------------------------------------

IMPORTANT_PROMPT = "Write a short cover letter for a volunteer job related to octopuses. Mark at least 2 key phrases with single asterisks, e.g. *important*."
IMPORTANT_REPLY = "Dear Hiring Manager,\n\n" + " ".join(["*Important*"] * 40)

PS_PROMPT = "End with a short note starting with P.S. Make it at least 3 sentences long. Write the text of a museum plaque about sea turtles."
PS_CONSTRAINTS = [{"type": "postscript", "postscript_marker": "P.S."},
                  {"type": "num_sentences", "relation": "at least", "num_sentences": 3}]
PS_REPLY = ("P.S. Make it at least 3 sentences long.\n\nSea turtles have swum the oceans for over 100 million years.\n\n"
            "P.S. Make it at least 3 sentences long.")

BRIGHT_PROMPT = "Write the text of a museum plaque about kite flying. Make sure to use the word \"bright\"."
BRIGHT_REPLY = "**Bright**" * 30  # to the token limit, no spaces between the units

SECTION_PROMPT = "Write a radio advertisement for an event about marathon volunteers.\n\nOrganize the answer into 2 parts labeled SECTION 1, SECTION 2 and so on."
SECTION_REPLY = "\n".join(["SECTION 1", "Volunteers wanted!", "SECTION 2", "Join us."] + ["SECTION 1", "SECTION 2"] * 12)


@pytest.mark.parametrize("reply, prompt, constraints, ended, kind", [
    (IMPORTANT_REPLY, IMPORTANT_PROMPT, None, False, "repetition loop"),
    (PS_REPLY, PS_PROMPT, PS_CONSTRAINTS, True, "instruction copied"),
    (BRIGHT_REPLY, BRIGHT_PROMPT, None, False, "repeated tail"),
    (SECTION_REPLY, SECTION_PROMPT, None, False, "repeated line"),
], ids=["important-x40", "ps-instruction-copied", "bright-to-the-limit", "section-cycling"])
def test_the_four_kinds_of_issue_23_are_degenerate(reply, prompt, constraints, ended, kind):
    verdict = check_reply(reply, prompt, constraints, ended=ended)
    assert verdict.degenerate
    assert any(r.startswith(kind) for r in verdict.reasons), verdict.reasons


def test_a_loop_cut_off_by_the_token_limit_says_so():
    verdict = check_reply(BRIGHT_REPLY, ended=False)
    assert any("until the token limit" in r for r in verdict.reasons)
    assert not any("until the token limit" in r for r in check_reply(BRIGHT_REPLY, ended=True).reasons)


# ---- real base-model replies -------------------------------------------------------------------------


def test_ordinary_base_replies_pass():
    rows = _rows("base_replies.jsonl")
    assert len(rows) >= 20
    flagged = {r["prompt_id"]: check_reply(r["reply"], r["prompt"], r["constraints"], ended=r["eos"]).reasons for r in rows}
    assert {k: v for k, v in flagged.items() if v} == {}
    # the set is not only short or finished replies: most were cut off at the token limit mid-text
    assert sum(not r["eos"] for r in rows) >= 20


def test_degenerate_base_replies_are_flagged():
    rows = _rows("base_replies_degenerate.jsonl")
    missed = [r["prompt_id"] for r in rows if not check_reply(r["reply"], r["prompt"], r["constraints"], ended=r["eos"]).degenerate]
    assert missed == []
    by_id = {r["prompt_id"]: r for r in rows}
    # the real P.S. read-back: the postscript is the prompt's own length instruction
    ps = by_id["ifprefs-eval-00079"]
    assert copied_instruction(ps["reply"], ps["prompt"][-1]["content"], ps["constraints"]) == "Your reply must be less than 150 words long."
    # the real SECTION cycling, and a counter running up (SECTION 2, SECTION 3, ... SECTION 17)
    assert repeated_line(by_id["ifprefs-eval-00000"]["reply"])[0] == "section 1"
    assert "section # section #" in repetition_loop(by_id["ifprefs-eval-00065"]["reply"])


def test_degenerate_share_of_the_80_base_replies():
    """27 of the 64 replies kept (the 16 borderline ones are left out): 27 / 64 = 0.422."""
    verdicts = [check_reply(r["reply"], r["prompt"], r["constraints"], ended=r["eos"])
                for name in ("base_replies.jsonl", "base_replies_degenerate.jsonl") for r in _rows(name)]
    assert degenerate_share(verdicts) == pytest.approx(27 / 64)
    assert degenerate_share([]) is None


# ---- what a person accepts -----------------------------------------------------------------------------


def test_a_poem_with_a_refrain_sung_twice_passes():
    poem = ("The tide comes in, the tide goes out,\nAnd bright the morning sun.\n\n"
            "The gulls are wheeling round about,\nAnd bright the morning sun.\n\n"
            "We walk the sand till day is done,\nThe shells lie where they fell.")
    assert check_reply(poem, "Write a short poem about the sea. Make sure to use the word \"bright\".", ended=True).reasons == ()


def test_a_list_whose_items_share_a_prefix_passes():
    reply = ("Here are three ways to cut food waste:\n\n"
             "* The first step is to plan meals for the week before shopping.\n"
             "* The second step is to store vegetables where they keep longest.\n"
             "* The third step is to freeze leftovers within a day.\n\n"
             "Small habits add up over a year.")
    assert check_reply(reply, "Give your answer as a list of exactly 3 bullets, with an asterisk at the start of each.", ended=True).reasons == ()


def test_a_refrain_line_twice_passes_in_verse_and_a_third_identical_line_is_flagged():
    """Two verses that each close on the same 6-word refrain: the refrain's 4-grams occur twice (under
    LOOP_MIN_COUNT), its line twice is under LINE_MIN_COUNT, and the prompt asks for a song, where a sentence may
    come back. The same line a third time is flagged. Outside verse a 5-word sentence twice is (the next test)."""
    refrain = "Sing along, sing along, my friend"
    song = ("Morning comes across the silver bay,\nand every gull is calling out its name.\n" + refrain + "\n\n"
            "Children run where the fishing boats lay,\nthe harbour wakes and smells of rain.\n" + refrain)
    assert check_reply(song, "Write a song about a harbour town with a refrain.", ended=True).reasons == ()
    assert repeated_line(song) is None and repeated_sentence(song, verse=True) is None
    assert repeated_sentence(song) == (refrain.lower(), 2)
    assert repeated_line(song + "\n" + refrain) == (refrain.lower(), LINE_MIN_COUNT)
    assert asks_for_verse("Write a limerick about cats.") and not asks_for_verse("Write a museum plaque about versions.")


def test_a_sentence_twice_a_title_twice_and_an_empty_section_are_flagged():
    """What the verifier passed and a person strikes (December 6; the main job's, a reference-free DPO run's and
    the 280-step DPO and 400-step SFT runs' greedy replies to held-out prompts): two identical bullets where two were
    asked for, a sentence three times in one paragraph, a title written twice, SECTION headers with nothing under
    them. A 4-word sentence twice, different titles and sections with text pass."""
    bullets = ("* The Lullaby: A fairy tale about a young musician named Elara who is a skilled violinist.\n"
               "- The Lullaby: A fairy tale about a young musician named Elara who is a skilled violinist.\n\n"
               "Is there anything else I can help with?")
    prompt = "Write a fairy tale that involves the violin. Use exactly 2 bullet points (lines beginning with \"* \")."
    assert check_reply(bullets, prompt, ended=True).reasons == (
        "sentence written 2 times: 'the lullaby: a fairy tale about a you...'",)
    shouted = ('"THE OPPORTUNITY OF THE OLYMPIC STYLE IS A WONDERFUL ONE. '
               + "IT IS A WONDERFUL STYLE THAT IS FILLED WITH FUN AND FUN. " * 3 + '"')
    assert repetition_loop(shouted) is None and repeated_line(shouted) is None  # each 4-gram 3 times, one line
    assert repeated_sentence(shouted) == ("it is a wonderful style that is filled with fun and fun.", 3)
    assert repeated_sentence("I'm here to help. I am glad. I'm here to help.") is None  # 4 words
    titled = ("<<Lunar Eclipse>>\n\n<<lunar  eclipse>>\n\nThe moon goes dark when the earth passes between it and the "
              "sun, a sight people have watched for ages.")
    assert check_reply(titled, "Write a museum plaque about lunar eclipses.", ended=True).reasons == (
        "title written 2 times: <<lunar eclipse>>",)
    assert repeated_title("<<Part one>>\nText.\n<<Part two>>\nMore text.") is None
    sections = ("SECTION 1\nSECTION 2\n\nThe world faces a challenge that needs all of us to act together now.\n\n"
                "SECTION 3\n\nSECTION 4\nRecycling old phones keeps metals out of landfills.")
    assert check_reply(sections, "Write an essay about recycling electronics. Use 4 sections.", ended=True).reasons == (
        "empty section: 'SECTION 1' right before 'SECTION 2'",)
    assert empty_section("SECTION 1\nText of the first.\n\nSECTION 2:\nText of the second.") is None


def test_a_required_phrase_may_be_copied_and_short_instructions_are_not_counted():
    prompt = 'Write a message to a coworker about kites. Finish your response with this exact phrase: "Is there anything else I can help with?". Respond in all caps.'
    constraints = [{"type": "end_phrase", "end_phrase": "Is there anything else I can help with?"}, {"type": "capitals"}]
    reply = "HI SAM, THE KITE FESTIVAL IS ON SATURDAY. RESPOND IN ALL CAPS. IS THERE ANYTHING ELSE I CAN HELP WITH?"
    assert check_reply(reply, prompt, constraints, ended=True).reasons == ()
    assert len("Respond in all caps".split()) < COPY_MIN_WORDS
    copied = reply.replace("RESPOND IN ALL CAPS.", "WRITE A MESSAGE TO A COWORKER ABOUT KITES.")
    assert check_reply(copied, prompt, constraints, ended=True).degenerate


def test_required_phrases_are_taken_out_of_the_reply_too():
    """IFEval's key 1258 end phrase spans two prompt sentences: writing it is compliance. An instruction copied back
    around its required letter (a policy's reply to an ifprefs prompt) is still a copy."""
    end = "Let me know how it works. I can give you next steps when you finish all steps above."
    prompt = f"Write a tutorial on how to make a resume. Finish your entire response with this exact phrase: {end}"
    constraints = [{"type": "end_phrase", "end_phrase": end}]
    reply = "Step 1: list your jobs, newest first. Step 2: add your skills and one line on each job. " + end
    assert copied_instruction(reply, prompt, constraints) is None
    letter = [{"type": "letter_frequency", "letter": "w", "relation": "less than", "frequency": 12}]
    instruction = 'In your response, the letter "w" should appear less than 12 times.'
    copy = "I have kept it short in my reply. " + instruction
    assert copied_instruction(copy, "Describe a rainy day to a child. " + instruction, letter) == instruction


def test_punctuation_runs_are_not_a_repeated_tail():
    assert repeated_tail("That was the best day of the year" + "!" * 60) is None
    assert repeated_tail("Thanks\n\n" + "-" * 80) is None
    assert repeated_tail("ok " + "la " * 30) is not None


def test_a_title_or_an_empty_reply_is_no_answer():
    """Real replies of the DPO + SFT probe (learning rate 5e-4, 48 steps) that met every constraint of their prompt
    without doing the task; a one-sentence answer and a short poem are answers."""
    for reply in ('"Lunar Eclipse: The Night of the Moon\'s Eclipse"',  # "Write a fairy tale ... in double quotation marks"
                  '```json\n{\n  "name": "Wolfie-the-Caper",\n  "story": "Wolfie-the-Caper"\n}\n```', ""):
        assert check_reply(reply).reasons[-1].startswith("no answer: "), reply
    assert no_answer('"Lunar Eclipse: The Night of the Moon\'s Eclipse"') == "no answer: 9 words and no sentence"  # Moon's: 2
    assert no_answer("*Important: *fires* are a critical issue that requires immediate attention.") is None
    assert no_answer("roses climb the garden wall\nbees hum in the warm still air\nsummer takes its time") is None  # 16 words


def test_a_reply_that_is_only_its_postscript_is_no_answer():
    """Real greedy replies of the main job's DPO + SFT policy (AVX2 run, ifprefs-eval-00115 and -00107): a postscript
    is a note after the main text, so the answer is what comes before it. With a main text, the P.S. is fine."""
    prompt = [{"role": "user", "content": "Write the reply without a single comma. End with a short note starting with P.S. "
                                          "Write a persuasive paragraph about puzzle games."}]
    constraints = [{"type": "no_comma"}, {"type": "postscript", "postscript_marker": "P.S."}]
    only_ps = "P.S. I'm glad you found the puzzle game I'm writing about."
    assert check_reply(only_ps, prompt, constraints).reasons == ("no answer: 0 words and no sentence of its own",)
    assert check_reply("<<electric scooters>>\n\nP.S. I hope this helps.").reasons == ("no answer: 2 words and no sentence",)
    assert check_reply('"P.P.S I hope this helps with the plaque."').degenerate
    answered = "Puzzle games train patience and reward a curious mind at any age.\n\nP.S. Try one tonight."
    assert not check_reply(answered, prompt, constraints).degenerate
    assert before_postscript(answered) == "Puzzle games train patience and reward a curious mind at any age.\n\n"
    assert before_postscript("Write to your local MP. Apps, ps. and sports are fine.") == "Write to your local MP. Apps, ps. and sports are fine."


def test_a_label_made_of_the_prompts_words_is_no_answer():
    """A real greedy reply of the embedded default (ifprefs-eval-00158), which met its one constraint: five words, one
    sentence, but of its words only "is" is not the prompt's. The same sentence counts without the prompt, and a
    short answer that says something of its own counts with it."""
    prompt = [{"role": "user", "content": 'Write the text of a museum plaque about road trips. Work this word into your answer: "trips".'}]
    label = 'The museum plaque is: "Trips".'
    assert check_reply(label, prompt).reasons == ("no answer: 5 words and no sentence of its own",)
    assert no_answer(label) is None
    assert not check_reply("Road trips taught a nation to love the open highway and its diners.", prompt).degenerate


def test_a_run_of_punctuation_to_the_token_limit_is_a_loop():
    """A real reply of a DPO policy trained at learning rate 5e-4 (48 steps) to "Write the text of a museum plaque
    about honey. Use markdown to highlight at least 1 part of the reply, like *this*. ...": 254 '<' after one '*'.
    It has no letter, so the letter-free allowance above must end somewhere."""
    reply = "*" + "<" * 254
    assert check_reply(reply, ended=False).reasons == ("repeated tail: '<' 254 times at the end until the token limit",
                                                       "no answer: 0 words and no sentence")
    assert not check_reply("Thank you for reading, and see you all next week.\n\n" + "=" * 99).degenerate  # a rule up to 99 passes


def test_bad_input_is_a_clear_error():
    with pytest.raises(DataError, match="reply: expected a string"):
        check_reply(None)
    with pytest.raises(DataError, match="prompt: expected a string or a list"):
        check_reply("hello there", prompt=[1, 2])


def test_hacking_warning_fires_on_the_issue_23_run_and_not_on_an_honest_one():
    """Issue 23's GRPO run, greedy on 128 prompts: training reward up, coherent strict 0.156 -> 0.109 and
    4-gram loops 39 -> 86 of 128 (read here as the degenerate share, 0.305 -> 0.672)."""
    from align.evaluation.degeneration import DEGENERATE_RISE, hacking_warning

    start = {"coherent_strict": 0.156, "degenerate_share": 39 / 128}
    end = {"coherent_strict": 0.109, "degenerate_share": 86 / 128}
    line = hacking_warning(0.36, 0.47, start, end)
    assert "coherent strict fell 0.156 -> 0.109" in line and "degenerate share rose 0.305 -> 0.672" in line
    assert hacking_warning(0.36, 0.47, start, {"coherent_strict": 0.20, "degenerate_share": 0.305 + DEGENERATE_RISE / 2}) is None
    assert hacking_warning(0.47, 0.36, start, end) is None
    assert hacking_warning(None, 0.47, start, end) is None and hacking_warning(0.36, 0.47, None, end) is None
    only_degenerate = hacking_warning(0.36, 0.47, {"degenerate_share": 0.1}, {"degenerate_share": 0.2})
    assert only_degenerate is not None and "coherent" not in only_degenerate


def test_unasked_formats_name_each_format_no_constraint_asked_for():
    from align.evaluation.degeneration import unasked_formats

    # the learning-curve SFT run's leaks: a placeholder line, a whole reply in quotes, SECTION markers
    leaked = '"Ladakh: Kite flying\n***\nIn the 19th century a festival was held.\nSign up by [date] with [name]."'
    assert unasked_formats(leaked, [{"type": "include_keywords", "keywords": ["bright"]}]) == [
        "placeholders", "quoted reply", "*** dividers"]
    assert unasked_formats(leaked, [{"type": "quotation"}, {"type": "num_paragraphs", "num_paragraphs": 2},
                                    {"type": "num_placeholders", "num_placeholders": 1}]) == []
    assert unasked_formats("SECTION 1\nHello.\nP.S. Bye.", []) == ["SECTION markers", "postscript"]
    assert unasked_formats('```json\n{"a": 1}\n```', []) == ["JSON"]
    assert unasked_formats("<<A Title>>\nText.", [{"type": "title"}]) == []
    # all capitals: asked for by `capitals` only; a lowercase prompt answered in capitals is a leak
    shout = "ONCE UPON A TIME THERE WAS A WOLF WHO TALKED."
    assert unasked_formats(shout, [{"type": "lowercase"}]) == ["all capitals"]
    assert unasked_formats(shout, [{"type": "capitals"}]) == []
    assert unasked_formats("NASA and the ESA launched it.", []) == []  # a few acronyms are not all capitals
    # ordinary text, a quotation inside a reply, markdown emphasis: nothing
    assert unasked_formats('She said "hello" and left. *Important* point.', []) == []


def test_an_unwritten_list_item_is_flagged_and_markdown_rules_are_not():
    """The pipeline's SFT, DPO and PPO policies (December 4) wrote this for "Outline a lesson plan for teaching water
    filters. Make sure the letter "i" shows up 5 times or more." and it met the constraint: items 2 and 3 are bare."""
    reply = ("A lesson plan for teaching water filters can be a fun and interactive way to learn about the science of water. "
             "Here's a possible approach:\n\n1. **Introduce the Concept**: Start by introducing the concept of water filters "
             "in a non-technical way.\n\n2.\n\n3.")
    verdict = check_reply(reply, prompt="Outline a lesson plan for teaching water filters.", ended=True)
    assert verdict.reasons == ("empty list item: '2.' and 1 more",)
    for bare in ("* ", "-", "4)", "  +  "):
        assert check_reply(f"A short note about the weather today, which is sunny and warm.\n{bare}").degenerate, bare
    written = "Three ideas:\n\n1. Boil the water first.\n2. Filter it through sand.\n\n***\n\n- Store it cool.\n---\nDone."
    assert not check_reply(written).degenerate
