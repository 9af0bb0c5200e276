"""``python -m unimodal ...``: the ``unimodal`` command (`unimodal.cli`) without the console script."""

from .cli import main

if __name__ == "__main__":
    main()
