"""Preference, SFT and prompt data: real formats in, canonical records (align.records) out.

    pairs = load_preferences("ifprefs:prefs_train")                 # list[PreferencePair]
    sft = load_sft("my_chats.jsonl", max_rows=1000)                   # list[SFTExample]
    prompts = load_prompts("hf:Anthropic/hh-rlhf:test")              # list[PromptRecord]
    align data check my_prefs.csv                                     # row count and format, or `error: ...`

Sources: a .jsonl, .json, .csv or .parquet file, the first three also compressed (.jsonl.gz, .csv.bz2,
.json.xz, .jsonl.zst, ...; .zst needs the `zstandard` package); a folder of such files (one file type,
compression included; with `split=`, the file or subfolder named after the split); `hf:NAME` or
`hf:NAME:SPLIT` (datasets.load_dataset, split "train" unless given); a built-in `NAME:SPLIT` such as
`ifprefs:prefs_train`, which is the folder `<repo>/datasets/NAME` (or $ALIGN_DATASETS_DIR/NAME) with that
split; or an in-memory list of row dicts.
JSONL, CSV and Parquet are streamed, compressed ones too (decompressed as they are read, with the same
line numbers); a JSON array file is read whole (use JSONL for big data), and a .json file that does not
start with `[` is read as JSON lines.

Row formats, detected per row from its fields (`format="auto"`) or forced with `format=`:

    strings            {"prompt": str | [msgs], "chosen": str, "rejected": str}
    conversational     {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}   TRL's format; the prompt
                       may also be a string, chosen/rejected may repeat the prompt as a prefix, and without
                       a prompt field they are whole conversations whose shared prefix is the prompt
    hh                 {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}   Anthropic HH-RLHF
    ranked             {"prompt": ..., "responses": [...], "scores": [...] | "ranking": [...]}   scores: higher
                       is better; ranking[i] is the rank of responses[i], 1 = best. Expanded into pairs:
                       pairs="all" (every pair with different scores) or "best_vs_each" (each top-scored
                       response against each lower one); ties give no pair
    messages           {"messages": [msgs]}                                        SFT
    prompt_completion  {"prompt": str | [msgs], "completion": str | [msgs]}        SFT
    prompt             {"prompt": str | [msgs]}                                    prompts only (eval files)
    ifeval             {"key": int, "prompt": str, "instruction_id_list": [...], "kwargs": [...]}   prompts
                       only: IFEval's input_data.jsonl, each instruction read as the constraint of
                       align.evaluation.verifier with its meaning (`from_ifeval`); an instruction with no
                       check here is a bad row, so on_bad_rows="skip" keeps the prompts that can be scored

The first row that loads fixes the format for the rest of the source (every file of a folder included),
so a row of another shape is reported against that format. Known metadata fields pass through (`id`,
`constraints`, `margin` for pairs) or are ignored (`meta`, `margin` elsewhere); any other field is an
error naming it unless `extra_fields="ignore"`. In CSV files, the cells of structured fields (messages,
constraints, meta, responses, scores, ranking) hold JSON, and prompt/chosen/rejected/completion cells may
hold a JSON list of messages.

Bad rows raise DataError naming the file, the line or row, the field and what was expected
(`on_bad_rows="error"`; the message goes on with how many more rows of that file are bad, of each kind,
from a scan of the rest of the file), or are skipped with a count per reason on stderr
(`on_bad_rows="skip"`). A problem with the file as a whole (empty, unreadable, a CSV quote left open to
the end of the file, compressed data cut short) is always an error. `max_rows` caps the number of
records returned (pairs, for ranked rows) and stops reading there.
"""

