"""Count test images whose true class gets a negative probability-space ResMem score (clamped in `logits`).

Each such image's `logits` give the true class about log(1e-8) = -18.4, so N_clamped * 18.4 / N bounds how
much of the probability-space NLL the clamp adds. Same data, carve and memory as calibration.py.

    python recipes/cifar100_resnet8/clamp_count.py --base-model DIR --data-dir DIR --setting 53 0.2 1.4
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tune-on-validation", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", type=float, nargs=3, action="append", metavar=("K", "SIGMA", "T"), required=True)
    args = p.parse_args(argv)
    from transformers import AutoModelForImageClassification

    from calibration import _train_module
    from resmem import ResMemWrapper

    m = _train_module()
    ns = argparse.Namespace(data_dir=args.data_dir, dataset=None, label_column=None, image_column=None,
                            train_split="train", test_split="test")
    train, test, lc, ic = m.load_splits(ns)
    train = train.train_test_split(test_size=args.tune_on_validation, stratify_by_column=lc, seed=args.seed)["train"]
    base = AutoModelForImageClassification.from_pretrained(args.base_model).eval()
    norm = m.Normalize(base.config.normalization["mean"], base.config.normalization["std"])
    model = ResMemWrapper.from_base(base)
    model.build_memory(train, progress=False, label_column=lc, image_column=ic, transform=norm, batch_size=512)
    for k, sigma, t in args.setting:
        model.config.k, model.config.sigma, model.config.residual_temperature = int(k), sigma, t
        negative = clamped = 0
        for start in range(0, len(test), 1000):
            rows = test.select(range(start, min(len(test), start + 1000)))
            y = torch.tensor(rows[lc])  # (B,)
            with torch.no_grad():
                out = model(pixel_values=norm(rows[ic]))
            true = out.scores.gather(1, y[:, None]).squeeze(1)  # (B,) the true class's score
            negative += int((true < 0).sum())
            clamped += int((true < model.config.score_floor).sum())
        print(f"k={int(k)} sigma={sigma} T={t}: true-class score < 0 on {negative}/{len(test)}, "
              f"below score_floor (clamped) on {clamped}/{len(test)}")


if __name__ == "__main__":
    main()
