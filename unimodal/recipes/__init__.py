"""The recipes: each module is one linear script with ``main(argv, prog)``.

Run one as ``unimodal <recipe> --config ...`` (installed package), ``accelerate launch -m
unimodal.recipes.<recipe> ...``, or, from a clone, ``accelerate launch recipes/<recipe>.py ...``
(a two-line wrapper around the module here). All three go through `unimodal.cli.run_recipe`
(the same help, and bad input as ``error: ...`` with exit status 2). Their YAML configs ship in
``configs/`` (package data; ``--config NAME`` finds them). The rest of the library never imports
a recipe.
"""
