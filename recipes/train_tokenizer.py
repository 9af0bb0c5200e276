"""`accelerate launch recipes/train_tokenizer.py ...` from a clone.

The recipe itself is `unimodal.recipes.train_tokenizer` (also `unimodal train-tokenizer ...` once installed).
"""

from unimodal.cli import run_recipe
from unimodal.recipes.train_tokenizer import main

if __name__ == "__main__":
    run_recipe(main)
