"""`index="auto"` on real data: what `model.tune` measures and chooses, and what the choice gives on test.

Takes a `recipes/cifar100_resnet8/train.py --tune-on-validation 0.1 --seed S` output folder and its image folder,
re-makes its validation carve, builds the memory of the remaining training images with the default
`index="auto"`, tunes on validation (which measures the candidate indexes there), and evaluates the test images
with the chosen index and with exact search.

    PYTHONPATH=src python benchmarks/check_auto_index_cifar.py --run outputs/seed0 --data-dir /tmp/cifar/cifar10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "cifar100_resnet8")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cifar_{name}", os.path.join(RECIPE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="train.py output folder (base_model/, results.json)")
    p.add_argument("--data-dir", required=True)
    args = p.parse_args(argv)
    import resmem
    import resmem.models  # noqa: F401  (registers CifarResNet with the Auto classes)
    from resmem import ResMemWrapper
    from transformers import AutoModelForImageClassification

    train_mod, variants = _load("train"), _load("variants")
    with open(os.path.join(args.run, "results.json")) as f:
        run_args = json.load(f)["args"]
    sp = variants.Splits(train_mod, args.data_dir, run_args["tune_on_validation"], run_args["seed"], {})
    base = AutoModelForImageClassification.from_pretrained(os.path.join(args.run, "base_model")).eval()
    norm = train_mod.Normalize(base.config.normalization["mean"], base.config.normalization["std"])
    train, val, test = (sp.with_pixels(sp.train, sp.x_train, norm), sp.with_pixels(sp.validation, sp.x_train, norm),
                        sp.with_pixels(sp.test, sp.x_test, norm))
    model = ResMemWrapper.from_base(base)  # index="auto", the default
    t = time.perf_counter()
    model.build_memory(train, batch_size=512, progress=False)
    at_build = dict(model.config.index_choice or {})
    print(f"build {time.perf_counter() - t:.1f} s; chosen at build (held-out entries): {at_build.get('choice')} {at_build.get('params')}")
    t = time.perf_counter()
    model.tune(val, k=[10, 20, 53, 100], sigma="auto", temperature=[0.7, 1.0, 1.4, 2.0], batch_size=512, progress=False)
    choice = model.config.index_choice
    print(f"tune {time.perf_counter() - t:.1f} s; chosen on validation: {choice['choice']} {choice['params']}, "
          f"exact gain {choice['exact_gain']:+.4f}")
    for m in choice["measured"]:
        if "error" not in m:
            print(f"  {m['spec']:<22} {str(m['params']):<36} speed-up {m['speedup']:6.2f}  agreement {m['agreement']:.4f}"
                  f"  gain kept {m['gain_kept']:.4f}")
    chosen = resmem.evaluate(model, test, split="test", batch_size=512, progress=False, record=False)
    model.config.index = "exact"
    exact = resmem.evaluate(model, test, split="test", batch_size=512, progress=False, record=False)
    print(f"test: chosen index {chosen['resmem_accuracy']:.4f} (gain {chosen['gain']:+.4f}); "
          f"exact {exact['resmem_accuracy']:.4f} (gain {exact['gain']:+.4f})")
    return {"at_build": at_build, "choice": choice, "test_chosen": chosen, "test_exact": exact}


if __name__ == "__main__":
    main()
