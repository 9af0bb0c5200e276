"""`accelerate launch recipes/finetune.py ...` from a clone.

The recipe itself is `unimodal.recipes.finetune` (also `unimodal finetune ...` once installed).
"""

from unimodal.cli import run_recipe
from unimodal.recipes.finetune import main

if __name__ == "__main__":
    run_recipe(main)
