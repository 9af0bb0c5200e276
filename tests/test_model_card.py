"""The model card of a fine-tuned folder: its usage example uses the run's own prompts (or a
generic one), names the package without a made-up link, and is valid Python."""

import ast
import re

from unimodal.outputs import model_card


def usage_block(card: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return code


def test_card_generates_from_the_runs_sample_prompts(tiny_pipeline):
    config = {"learning_rate": 1e-3, "sample_prompts": ['a "red" square', "a blue circle"]}
    card = model_card(tiny_pipeline.processor, config, base="tiny-llama", name="me/shapes-lm", adapter=False)
    code = usage_block(card)
    ast.parse(code)  # quotes in the prompt are escaped
    call = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                "generate_images")
    assert ast.literal_eval(call.args[2]) == ['a "red" square']
    assert 'from_pretrained("me/shapes-lm")' in code
    assert "learning_rate: 0.001" in card


def test_card_without_sample_prompts_is_generic_and_links_nowhere(tiny_pipeline):
    for adapter in (False, True):
        card = model_card(tiny_pipeline.processor, {"tasks": ["t2i"]}, base="tiny", name="out/final", adapter=adapter)
        ast.parse(usage_block(card))
        assert "digit" not in card and "http" not in card
        assert "`unimodal`" in card
    merged = model_card(tiny_pipeline.processor, {}, base="tiny", name="out/final", adapter=False)
    assert '["a photo of a cat"]' in usage_block(merged)
