"""`python -m bench.tiny_release OUT [--corpus FILE.jsonl]`: a released checkpoint in miniature,
for trying continued pretraining end to end on a CPU with nothing downloaded.

OUT becomes a Hugging Face DeepSeek-V3 folder (config.json, safetensors, tokenizer.json and
tokenizer_config.json with an `<eos>` token, generation_config.json), as a release ships: a
byte-level BPE of 1,024 ids trained on the running Python's standard library, and the tiny config's
model (configs/tiny.yaml) trained on that library with it for `--steps` steps. `--corpus` also
writes a JSONL corpus of other text to continue on: the standard library's documentation-like
files (*.txt, *.rst, *.json under it), one record per file.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stdlib(suffixes: tuple[str, ...], limit: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(suffixes):
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        texts.append(f.read())
                except (OSError, UnicodeDecodeError):
                    continue
                total += len(texts[-1])
                if total >= limit:
                    return texts
    return texts


def make_release(out: str, steps: int) -> None:
    from generated.parser import resolve
    from runtime.components.tokenizer import TextCodec
    from runtime.interop.hf_folder import export_hf
    from runtime.trainer.trainer import Trainer

    codec = TextCodec.train_bpe(_stdlib((".py",), 4 << 20), 1023)
    codec.tokenizer.add_special_tokens(["<eos>"])
    codec.eos_id = codec.tokenizer.token_to_id("<eos>")
    codec.kind = "pretrained"
    with tempfile.TemporaryDirectory() as tmp:
        codec.save_hf(os.path.join(tmp, "tokenizer"))
        argv = ["--out_dir", os.path.join(tmp, "run"), "--model.vocab_size", "1024",
                "--data.tokenizer", os.path.join(tmp, "tokenizer"), "--training.max_iters", str(steps),
                "--checkpointer.save_interval", "0", "--sample.max_new_tokens", "0",
                "--evaluator.eval_interval", str(steps)]  # fmt: skip
        resolved = resolve(str(REPO / "configs" / "tiny.yaml"), argv=argv)
        trainer = Trainer(resolved.config, resolved)
        trainer.run()
        export_hf(trainer.model, out, tokenizer=trainer.codec)
    print(
        f"wrote {out}: the tiny config's model after {steps} steps, a 1,024-id tokenizer with <eos>"
    )


def write_corpus(path: str) -> None:
    texts = _stdlib((".txt", ".rst", ".json", ".cfg", ".toml"), 6 << 20)
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"wrote {path}: {len(texts):,} records, {os.path.getsize(path) / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiny_release", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--corpus", help="also write a JSONL corpus here")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    args = parser.parse_args()
    make_release(args.out, args.steps)
    if args.corpus:
        write_corpus(args.corpus)


if __name__ == "__main__":
    main()
