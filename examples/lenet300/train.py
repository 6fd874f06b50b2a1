"""Train LeNet-300-100 on MNIST (or reuse the cached checkpoint) — the recipe's `model` and `train`
sections drive it, exactly as `pyserve compress` does before compressing.

    python examples/lenet300/train.py        # writes examples/lenet300/checkpoint/lenet300.pt
"""

from pathlib import Path

from pyserve.compress._train import Task, accuracy
from pyserve.compress.pipeline import prepare_model
from pyserve.compress.recipe import load_recipe


def main() -> None:
    recipe = load_recipe(Path(__file__).with_name("recipe.yaml"))
    task = Task.from_dataset(recipe.data.dataset, batch_size=recipe.train.batch_size, lr=recipe.train.lr,
                             seed=recipe.seed)
    model = prepare_model(recipe, task)
    print(f"lenet300: test accuracy {accuracy(model, task.test_x, task.test_y):.4f}")


if __name__ == "__main__":
    main()
