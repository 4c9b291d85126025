"""`python recipes/reward.py --config …` in a checkout (or under accelerate launch): kochat_trl.recipes.reward."""

from kochat_trl.recipes.reward import main, make_parser
from kochat_trl.recipes.steps import run_recipe

if __name__ == "__main__":
    run_recipe(make_parser, main)
