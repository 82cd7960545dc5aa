"""Profile transfer (Venkatesan et al., 2020): a layer-wise profile found on one
network, applied to another network of the same architecture.

The source is the shipped lenet300-fmnist (training seed 0); the targets are
LeNet-300-100s trained here with the shipped recipe and other seeds
(``gapruning train --model lenet300 --seed N``, cached under
``$GAPRUNING_BENCH_CACHE``, ~40 s each). At each share of hidden units removed
(global budget, the profile methods choose the per-layer ratios), for
``profile_rl`` and ``profile_random``:

* **on source**: the search on the source network (its profile saved as JSON);
* **transferred**: that JSON applied to the target, no search (what
  ``gapruning prune --profile profile.json`` does);
* **searched on target**: the same search run on the target itself;

next to L1 on the target (same share per layer, and global). Test accuracy on
the 10,000 Fashion-MNIST test images, FGSM at eps 0.05 on the first
``--attack-samples``; no fine-tuning. Searches are data-free (default fitness);
the training data is read only to train the targets.

Run: ``python benchmarks/profile_transfer.py [--quick]``; writes
``results/profile_transfer.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, machine, write  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.cli import main as cli  # noqa: E402
from gapruning.methods.profile import profile_of  # noqa: E402

SOURCE = "lenet300-fmnist"
SEARCHES = ("profile_rl", "profile_random")


def trained_target(seed: int) -> gp.Pretrained:
    """LeNet-300-100 trained with the shipped recipe and ``seed`` (cached)."""
    out = CACHE / f"lenet300-fmnist-seed{seed}"
    if not (out / "model.json").exists():
        code = cli(
            ["train", "--model", "lenet300", "--seed", str(seed)]
            + ["--out", str(out), "--overwrite", "--quiet"]
        )
        if code:
            raise RuntimeError(f"training lenet300 seed {seed} failed ({code})")
    return gp.load(str(out))


def scores(model, test, attack_set) -> dict:
    clean = gp.evaluate(model, test, attacks=(), eps=())
    adv = gp.evaluate(model, attack_set, attacks=("fgsm",), eps=(0.05,))
    return {"accuracy": clean["accuracy"], "fgsm": adv["fgsm"][0.05]}


def markdown(result) -> str:
    s = result["settings"]
    lines = [
        "# Profile transfer: a profile found on one LeNet-300-100, applied to another",
        "",
        f"{result['machine']['date']}, {result['machine']['cores']} CPU cores, jax "
        f"{result['machine']['jax']}. Source {SOURCE} (seed 0); targets trained "
        f"here with the shipped recipe, seeds {s['target_seeds']}. Searches: "
        f"{s['generations']} generations x {s['population']}, default data-free "
        f"fitness, search seed {s['search_seed']}. Hidden units removed under a "
        "global budget. Test accuracy on the 10,000 test images, FGSM at eps 0.05 "
        f"on the first {s['attack_samples']}; no fine-tuning.",
        "",
        "| removed | target | row | acc % | FGSM % | s |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {100 * r['target']:.0f}% | {r['model']} | {r['row']} | "
            f"{100 * r['accuracy']:.2f} | {100 * r['fgsm']:.2f} | {r['seconds']:.1f} |"
        )
    lines += ["", "Profiles (kept share per layer, fc1/fc2):", ""]
    for p in result["profiles"]:
        lines.append(f"- {p['label']}: {p['keep']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", default="0.5,0.7")
    ap.add_argument("--target-seeds", default="1,2")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--attack-samples", type=int, default=2000)
    args = ap.parse_args()
    levels = [float(v) for v in args.targets.split(",")]
    seeds = [int(v) for v in args.target_seeds.split(",")]
    gens = 2 if args.quick else args.generations
    if args.quick:
        levels, seeds = levels[:1], seeds[:1]
    test = gp.data.fashion_mnist("test")
    attack_set = (
        test.images[: args.attack_samples],
        test.labels[: args.attack_samples],
    )
    source = gp.load(SOURCE)
    targets = {seed: trained_target(seed) for seed in seeds}
    settings = {
        "generations": gens,
        "population": args.population,
        "search_seed": 0,
        "target_seeds": seeds,
        "attack_samples": args.attack_samples,
    }
    result = {"machine": machine(), "settings": settings, "rows": [], "profiles": []}
    search = dict(generations=gens, population=args.population, seed=0)
    profiles_dir = CACHE / "profiles"

    def run(model, level, row, strategy, record_profile=True, **options):
        """Prunes ``model`` (timed), scores it, records the row (and the profile)."""
        t0 = time.perf_counter()
        found = gp.prune(model, strategy, level, progress=False, recover=(), **options)
        entry = {
            "model": model.name,
            "target": level,
            "row": row,
            "seconds": time.perf_counter() - t0,
        }
        entry.update(scores(found.pruned, test, attack_set))
        result["rows"].append(entry)
        if record_profile:
            keep = {k: round(v, 3) for k, v in profile_of(model, found.masks).items()}
            result["profiles"].append(
                {"label": f"{row}, {model.name}, {level}", "keep": keep}
            )
        print(json.dumps(entry), flush=True)
        write(
            "profile_transfer" + ("_quick" if args.quick else ""),
            result,
            markdown(result),
        )

    for level in levels:
        for name in SEARCHES:
            path = str(profiles_dir / f"{name}-{level}.json")
            saving = {"save_profile": path}
            run(
                source,
                level,
                f"{name} on source",
                name,
                strategy_options=saving,
                **search,
            )
            for target in targets.values():
                applying = {"profile": path}
                run(
                    target,
                    level,
                    f"{name} transferred",
                    name,
                    strategy_options=applying,
                )
                run(target, level, f"{name} searched on target", name, **search)
        for target in targets.values():
            for label, per_group in (
                ("L1 same share per layer", True),
                ("L1 global", False),
            ):
                run(target, level, label, "l1", False, per_group=per_group)


if __name__ == "__main__":
    main()
