"""`accelerate launch recipes/generate.py ...` from a clone.

The recipe itself is `unimodal.recipes.generate` (also `unimodal generate ...` once installed).
"""

from unimodal.cli import run_recipe
from unimodal.recipes.generate import main

if __name__ == "__main__":
    run_recipe(main)
