"""`accelerate launch recipes/tokenize_dataset.py ...` from a clone.

The recipe itself is `unimodal.recipes.tokenize_dataset` (also `unimodal tokenize-dataset ...` once installed).
"""

from unimodal.cli import run_recipe
from unimodal.recipes.tokenize_dataset import main

if __name__ == "__main__":
    run_recipe(main)
