"""`phi1-recipe`: the paper's whole data loop as one command, cached step by step, with provenance.

    phi1-recipe run recipes/phi1.yaml                      # or: python -m phi1.recipe run recipes/phi1.yaml
    phi1-recipe run recipes/tiny_cpu.yaml steps.filter.threshold=0.6 --until preprocess

Steps, in order: annotate -> classifier -> filter -> dedup -> textbooks -> exercises -> decontaminate ->
preprocess -> pretrain -> finetune -> evaluate (phi1/recipe/steps.py). `spec.py` reads and checks the recipe
file, `runner.py` decides which steps to run from their content hashes and writes the provenance manifests.
"""

from phi1.recipe.runner import Runner
from phi1.recipe.spec import ConfigError, Recipe, load_recipe
from phi1.recipe.steps import STEPS, StepFailed

__all__ = ["STEPS", "ConfigError", "Recipe", "Runner", "StepFailed", "load_recipe"]
