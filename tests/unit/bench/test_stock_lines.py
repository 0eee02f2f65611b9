"""bench/stock_lines.py: the data's lines that recur across prompts, and the held-out replies that copy them unasked."""

import json

from recipe_harness import run_cli

from bench.stock_lines import line_counts, stock_lines, unasked_lines

JOIN = "Join us at [location] on [date] at [time]."


def test_a_stock_line_counts_prompts_not_replies_and_ignores_case_and_short_lines():
    examples = [("p1", f"Hello.\n{JOIN}"), ("p1", f"Again.\n  {JOIN.upper()}  "), ("p2", f"x\n{JOIN}"),
                ("p3", "Thanks for reading.\nok"), ("p4", "Thanks for reading.")]
    assert stock_lines(examples, min_prompts=2, min_chars=12) == {JOIN.lower(): 2, "thanks for reading.": 2}
    assert stock_lines(examples, min_prompts=3, min_chars=12) == {}
    assert "ok" not in stock_lines(examples, min_prompts=1, min_chars=12)


def test_a_line_the_prompt_asks_for_is_not_a_copy():
    line = "is there anything else i can help with?"
    asked = 'Close with the phrase "Is there anything else I can help with?".'
    assert unasked_lines(asked, "A story.\nIs there anything else I can help with?", [line], 12) == set()
    assert unasked_lines("Write a story.", "A story.\nIs there anything else I can help with?", [line], 12) == {line}
    assert unasked_lines("Write a story.", "Is there anything else I can help with? Yes.", [line], 12) == set()  # not a line of its own
    answers = [("Write.", f"a\n{JOIN}"), ("Write.", f"{JOIN}\n{JOIN}"), (f"End with {JOIN}", JOIN), ("Write.", "none")]
    held = [unasked_lines(prompt, reply, [JOIN.lower()], 12) for prompt, reply in answers]  # as main() counts them
    assert line_counts(held, [JOIN.lower()]) == {JOIN.lower(): 2}


def test_the_table_counts_each_evaluations_unasked_copies(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Write about topic {i}."},
                                                     {"role": "assistant", "content": f"Text {i}.\n{JOIN}"}]}) + "\n"
                            for i in range(3)))
    runs = []
    for name, replies in (("start", ["plain text", "more text"]), ("trained", [f"Story.\n{JOIN}", "plain text"])):
        (tmp_path / name).mkdir()
        rows = [{"prompt_id": f"e{i}", "prompt": [{"role": "user", "content": "Write a story."}], "constraints": [],
                 "mode": "greedy", "reply": reply, "eos": True, "verifier_strict": True} for i, reply in enumerate(replies)]
        (tmp_path / name / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(f"{name}={tmp_path / name}")
    proc = run_cli(["bench/stock_lines.py", "--data", str(data), "--min_prompts", "3", *runs])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"| {JOIN.lower()} | 3 | 0 | 1 |" in proc.stdout
    assert "| any stock line | | 0 of 2 | 1 of 2 |" in proc.stdout
