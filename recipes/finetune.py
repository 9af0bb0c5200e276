"""`accelerate launch recipes/finetune.py ...` from a clone; the recipe itself is `unimodal.recipes.finetune`
(also `unimodal finetune ...` once installed)."""

from unimodal.recipes.finetune import main

if __name__ == "__main__":
    main()
