"""Pack the data sets folklm ships into ``src/folklm/datasets`` (a maintainer tool).

    python scripts/pack_datasets.py /path/to/data   # a folder laid out as <set>/<file>

Each file is compressed with ``xz -9e`` (Python's lzma, preset 9 | EXTREME) unless it is
already compressed (``.bz2``, ``.gz``: stored byte for byte). Each set's ``SOURCE.md`` is
copied with a note of what was shipped and how; ``MANIFEST.json`` records, per file, the
stored name, the uncompressed size and its sha256 (checked on every decompression).
Only this tool reads the source folder; folklm and its tests read the packed copies.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "folklm" / "datasets"

# set -> the files folklm uses (built-in eval tasks, perplexity, tuning and test fixtures)
MMLU_SUBJECTS = None  # every subject found in mmlu/test (the built-in mmlu group uses all 57)
SETS: dict[str, list[str]] = {
    "alpaca_tiny": ["alpaca_tiny.json"],
    "arc_challenge": ["arc_challenge.jsonl"],
    "arc_easy": ["arc_easy.jsonl"],
    "boolq": ["boolq.jsonl"],
    "gsm8k": ["test.jsonl", "train.jsonl"],
    "hellaswag_val_text": ["hellaswag_val_full.txt.bz2"],
    "hh_rlhf_harmless_base_test": ["harmless-base/test.jsonl.gz"],
    "lambada_openai": ["lambada_openai.jsonl"],
    "mmlu": [],  # filled below: test/*.csv and dev/*.csv (val is not used)
    "openbookqa": ["openbook_qa.jsonl"],
    "sharegpt_dummy_conversation": ["dummy_conversation.json"],
    "stack_exchange_paired_tiny": ["stack_exchange_paired_tiny.json"],
    "tinyshakespeare": ["input.txt"],
    "wikitext2_raw_test": ["wiki.test.raw"],
    "winogrande": ["winogrande.jsonl"],
}
NOTES = {
    "mmlu": "Only the `test` split (the built-in `mmlu_<subject>` tasks) and the `dev` split "
    "(their 5-shot examples, lm-eval's `fewshot_split: dev`) are shipped; `val` is left out.",
    "gsm8k": "Both files are shipped whole: the built-in task scores `test.jsonl` and draws its "
    "few-shot examples from all of `train.jsonl`, as lm-eval does (its sampler's draws depend "
    "on the size of the pool).",
}


def main(src: Path) -> None:
    manifest: dict[str, dict] = {}
    for name, files in SETS.items():
        if name == "mmlu":
            files = [
                f"{split}/{p.name}"
                for split in ("test", "dev")
                for p in sorted((src / name / split).glob("*.csv"))
            ]
        (OUT / name).mkdir(parents=True, exist_ok=True)
        lines = []
        for rel in files:
            raw = (src / name / rel).read_bytes()
            key = f"{name}/{rel}"
            if rel.endswith((".bz2", ".gz")):
                stored, data, how = key, raw, "stored byte for byte (already compressed)"
            else:
                stored = key + ".xz"
                data = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
                how = "xz -9e"
            (OUT / stored).parent.mkdir(parents=True, exist_ok=True)
            (OUT / stored).write_bytes(data)
            manifest[key] = {
                "stored": stored,
                "bytes": len(raw),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
            lines.append(f"| `{rel}` | `{Path(stored).name}` | {len(raw)} | {len(data)} | {how} |")
        source = (src / name / "SOURCE.md").read_text(encoding="utf-8").rstrip("\n")
        if len(lines) > 12:
            shown = lines[:3] + [f"| ... {len(lines) - 6} more ... | | | | |"] + lines[-3:]
        else:
            shown = lines
        note = [
            "",
            "## As shipped in folklm",
            "",
            "Packed by `scripts/pack_datasets.py` from the copy described above; the content "
            "is unchanged (each file's sha256 is in `folklm/datasets/MANIFEST.json` and is "
            "checked when folklm decompresses it).",
        ]
        if name in NOTES:
            note += ["", NOTES[name]]
        note += [
            "",
            "| file | stored as | bytes | bytes stored | how |",
            "|---|---|---|---|---|",
            *shown,
            "",
        ]
        (OUT / name / "SOURCE.md").write_text(source + "\n" + "\n".join(note), encoding="utf-8")
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
