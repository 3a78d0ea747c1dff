"""Every recipe under recipes/ opens with its command and loads into its stage's typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import check_recipe, recipe_command

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_recipe_loads(path):
    command = recipe_command(path)
    assert command[0] == "distill" and f"--recipe" in command, f"{path}: the opening comment gives the full command"
    check_recipe(path)
