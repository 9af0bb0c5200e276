"""The recipes: each module is one linear script with ``main(argv)``.

Run one as ``unimodal <recipe> --config ...`` (installed package), ``accelerate launch -m
unimodal.recipes.<recipe> ...``, or, from a clone, ``accelerate launch recipes/<recipe>.py ...``
(a two-line wrapper around the module here). The rest of the library never imports a recipe.
"""
