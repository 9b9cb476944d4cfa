"""Hugging Face <-> megatron-core checkpoint conversion (the same as `megatron-dapo convert`).

    python tools/convert_checkpoint.py hf-to-mcore --hf MODEL_DIR --out MCORE_DIR [--verify]
    python tools/convert_checkpoint.py mcore-to-hf --mcore RUN/checkpoints/step_000100 --out HF_DIR \
        [--dtype bf16] [--hf-template MODEL_DIR] [--shard-size 5GB] [--verify]
"""
import sys

from megatron_dapo.convert.main import main

if __name__ == "__main__":
    sys.exit(main(prog="convert_checkpoint.py"))
