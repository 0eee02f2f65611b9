"""The rows every arm of a stage benchmark trains on: a slice of the built-in data (or any data source), or
synthetic preference pairs where the built-in data is missing."""

from __future__ import annotations

import random

from align.errors import ConfigError

_TOPICS = [
    "the ocean tides", "city bicycles", "coffee roasting", "volcanoes", "public libraries", "honeybees",
    "the night sky", "baking bread", "chess openings", "rain forests", "electric cars", "the moon",
    "jazz music", "mountain hiking", "recycling plastic", "a good night's sleep", "night trains",
    "vegetable gardens", "the human heart", "making paper", "desert plants", "old lighthouses",
]
_ASKS = [
    "Write {n} sentences about {topic}.",
    "Explain {topic} to a ten-year-old in fewer than {w} words.",
    "Give me a short list of facts about {topic}, with exactly {n} bullet points.",
    "Describe {topic} and end your answer with the word 'Done'.",
    "Write a short paragraph about {topic} and use the word '{kw}' at least twice.",
    "Tell me why people care about {topic}. Answer in {n} sentences, all in lowercase.",
]
_CONTEXT = [
    "I am preparing a lesson for my students next week.",
    "My grandmother asked me about this yesterday and I did not know what to say.",
    "Please keep it friendly and simple.",
    "I only need the main ideas, nothing too technical.",
    "This is for a newsletter that goes out on Friday.",
]
_OPENERS = ["Here is what I know.", "Sure.", "Good question.", "Of course, here you go.", "Let me explain."]
_SENTENCES = [
    "{Topic} can teach us a lot about patience and care.",
    "Many people first notice {topic} when they are young, and the interest often stays for life.",
    "Scientists have studied {topic} for more than a hundred years, and they still find surprises.",
    "One simple way to learn about {topic} is to watch closely and write down what you see.",
    "It is easy to forget how much work goes into {topic} behind the scenes.",
    "Some of the best stories about {topic} come from ordinary people, not experts.",
    "If you want to go further, a local library will have several good books on {topic}.",
    "The most important thing about {topic} is that it changes slowly over time.",
    "People who care about {topic} often meet to share tips and small discoveries.",
    "A common mistake is to think that {topic} is simple, when it is full of small details.",
    "You do not need expensive tools to enjoy {topic}; curiosity is enough.",
    "In many places, {topic} is part of everyday life, and nobody thinks twice about it.",
]
_KEYWORDS = ["bright", "gentle", "careful", "steady", "simple"]


def synthetic_pairs(n: int, seed: int = 0):
    """`n` natural-ish preference pairs (instruction prompts with a constraint, replies of 1-9 sentences),
    the same for the same seed: the stand-in while the built-in data is missing."""
    from align.records import PreferencePair

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        k = rng.randint(2, 6)
        ask = rng.choice(_ASKS).format(n=k, topic=topic, w=10 * k + 20, kw=rng.choice(_KEYWORDS))
        context = " ".join(rng.sample(_CONTEXT, rng.randint(0, 3)))
        prompt = (context + " " + ask).strip()

        def reply(sentences: int) -> str:
            body = [s.format(topic=topic, Topic=topic[0].upper() + topic[1:]) for s in rng.sample(_SENTENCES, sentences)]
            return " ".join([rng.choice(_OPENERS)] + body)

        chosen, rejected = reply(k), reply(rng.randint(1, 9))
        if chosen == rejected:
            rejected = rejected + " That is all."
        pairs.append(PreferencePair(prompt=[{"role": "user", "content": prompt}], chosen=chosen, rejected=rejected, source=f"synthetic:{i}"))
    return pairs


def load_slice(kind: str, source: str, rows: int, tokenizer, max_length: int, seed: int) -> tuple[list, str]:
    """`rows` training records of `kind` ("prefs" or "sft") no longer than max_length, and where they came from."""
    from align.data.load import check_lengths, load_preferences, load_sft
    from align.data.sources import datasets_dir
    from align.records import SFTExample

    if source == "auto":
        source = "ifprefs:prefs_train" if (datasets_dir() / "ifprefs").is_dir() else "synthetic"
    if source == "synthetic":
        records = []
        for attempt in range(8):  # overlong rows are dropped; draw more until there are enough
            pairs = synthetic_pairs(rows * (attempt + 2), seed)
            records = check_lengths(pairs, tokenizer, max_length, on_too_long="skip")
            if len(records) >= rows:
                break
        if kind == "sft":
            records = [SFTExample(messages=p.prompt + [{"role": "assistant", "content": p.chosen}], source=p.source) for p in records]
    else:
        if kind == "sft" and source == "ifprefs:prefs_train":
            source = "ifprefs:sft"
        loader = load_preferences if kind == "prefs" else load_sft
        records = check_lengths(loader(source, max_rows=rows * 4), tokenizer, max_length, on_too_long="skip")
    if len(records) < rows:
        raise ConfigError(f"data {source}: {len(records)} rows of at most {max_length} tokens; the run needs {rows}")
    return records[:rows], source

