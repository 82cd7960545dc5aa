"""Which torchvision classifiers gapruning converts, prunes, compacts and exports.

Issue 29, part B: for every image-classification builder of
``torchvision.models`` (``list_models(module=torchvision.models)``), with random
weights (BatchNorm running statistics randomized too), ``num_classes=10`` and the
smallest input of ``--sizes`` the torch model accepts (32x32 where it can; the
size is part of the row), one row of stages, each timed and, when it fails,
recorded with the first line of its error:

* ``convert``: ``gp.convert.from_torch(module, input_shape=..., num_classes=10)``;
* ``parity``: converted logits against torch's, relative error
  (max abs difference / max abs torch logit) <= ``TOL``;
* ``prune``: ``gp.prune(net, "ga", target=0.3, budget="flops")`` with 2
  generations, population 4, 8 probes (a smoke test of the whole pipeline, not a
  search worth its name);
* ``compact``: ``gp.compact`` of the found masks; outputs equal
  ``gp.masked_apply`` of the masks (<= ``TOL``), parameter count equals
  ``net.space.params(masks)``;
* ``export_torch``: ``gp.convert.to_torch_module`` of the compacted model,
  outputs equal to ours;
* ``export_onnx``: ``gp.convert.to_onnx``, run with onnxruntime, outputs equal;
* ``onnx_legacy`` / ``onnx_dynamo``: the torch model exported with
  ``torch.onnx.export(dynamo=False)`` / ``(dynamo=True)`` and read back with
  ``gp.convert.from_onnx``, logits against torch's (independent of ``convert``).

A stage that needs a failed one is ``skipped``. Each model runs in its own
process (``--timeout`` seconds; a hang or a crash fails the stage it was in),
and the report is rewritten after every model, so a sweep stopped part-way keeps
its finished rows. Builders with more than ``--max-params`` parameters (at 10
classes) are skipped with their size, not run.

Run: ``python benchmarks/architectures.py`` (every builder, about an hour on 2
CPU cores) or ``--quick`` (resnet18, squeezenet1_1: small graphs);
``--models a,b`` picks builders, ``--resume`` runs those the saved report
lacks, ``--update`` re-runs some, ``--render-only`` rewrites the ``.md``.
Output: ``benchmarks/results/architectures.{json,md}`` (the page is written by
``architectures_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from architectures_report import STAGES, counts, markdown, write_report  # noqa: E402
from common import RESULTS, import_torchvision, machine  # noqa: E402

from gapruning.files import write_text_atomic  # noqa: E402

__all__ = ["STAGES", "counts", "markdown", "write_report"]  # the report, re-exported

# stage -> the stage it needs
NEEDS = {"parity": "convert", "prune": "parity", "compact": "prune"}
NEEDS |= {"export_torch": "compact", "export_onnx": "compact"}
QUICK = ("resnet18", "squeezenet1_1")
TOL = 1e-4
SIZES = (32, 64, 96, 128, 160, 224, 299)
# builders whose input size is a constructor argument (positional embeddings...)
SIZE_KEYWORD = {"vit_": "image_size", "maxvit_": "input_size"}
# the auxiliary classifiers of these are training-only; leave them out
NO_AUX = ("googlenet", "inception_v3")
BATCH = 4
SIZE_WORDS = dict(t=0, tiny=0, s=1, small=1, m=2, b=3, base=3, l=4, large=4, h=5)
# a sweep runs one builder of each family first (the smallest name in natural
# order), so a sweep stopped part-way has seen every family
FAMILIES = (
    *("wide_resnet", "resnext", "resnet", "vgg", "mobilenet_v2", "mobilenet_v3"),
    *("efficientnet_v2", "efficientnet", "mnasnet", "densenet", "shufflenet_v2"),
    *("squeezenet", "regnet_x", "regnet_y", "convnext", "swin_v2", "swin", "maxvit"),
    "vit",
)


class Mismatch(AssertionError):
    """Outputs or counts that differ where the stage says they must not."""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small builders")
    p.add_argument("--models", help="comma-separated builder names (default: all)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per model")
    p.add_argument("--max-params", type=float, default=150e6, help="0: no limit")
    p.add_argument("--jobs", type=int, default=1, help="models run at once")
    p.add_argument("--update", action="store_true", help="replace these rows only")
    p.add_argument("--resume", action="store_true", help="run missing rows only")
    p.add_argument("--out", default=str(RESULTS / "architectures"))
    p.add_argument("--render-only", action="store_true", help="rewrite the .md")
    p.add_argument("--one", help=argparse.SUPPRESS)  # worker: one model
    p.add_argument("--row-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.models:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    elif args.quick:
        args.models = list(QUICK)
    if args.timeout <= 0 or args.jobs < 1:
        p.error("--timeout and --jobs must be positive")
    return args


def builders() -> list[str]:
    """Every image-classification builder of ``torchvision.models``."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def family_first(names) -> list[str]:
    """``names`` with the first of each family (natural order: resnet18 before
    resnet101) in front, then the second of each, and so on."""

    def natural(name):
        tokens = [t for t in re.split(r"(\d+)|_", name) if t]
        return [
            (0, int(t), "") if t.isdigit() else (1, SIZE_WORDS.get(t, 9), t)
            for t in tokens
        ]

    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=natural):
        family = next((f for f in FAMILIES if name.startswith(f)), name)
        groups.setdefault(family, []).append(name)
    rounds = max((len(g) for g in groups.values()), default=0)
    return [g[i] for i in range(rounds) for g in groups.values() if i < len(g)]


# ------------------------------------------------------------------ one model


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    lines = [s for s in str(err).strip().splitlines() if s.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def build_torch(name: str, sizes, max_params: float):
    """-> (eval-mode module with random BatchNorm statistics, input size, note)."""
    import torch

    tv = import_torchvision()
    keyword = next((k for p, k in SIZE_KEYWORD.items() if name.startswith(p)), None)
    extra = {"aux_logits": False, "init_weights": True} if name in NO_AUX else {}
    errors = []
    module = None
    for size in sizes:
        torch.manual_seed(0)
        kw = dict(extra)
        if keyword is not None:
            kw[keyword] = size if keyword == "image_size" else (size, size)
        try:  # a size can be too small for the builder or for its pooling
            if module is None or keyword is not None:
                module = tv.models.get_model(name, weights=None, num_classes=10, **kw)
                check_size(module, max_params)
                randomize_bn(module.eval())
            with torch.no_grad():
                module(torch.zeros(2, 3, size, size))
        except Skipped:
            raise
        except Exception as err:
            errors.append(f"{size}: {first_line(err)}")
            continue
        note = "" if size == sizes[0] else f"smaller sizes fail ({errors[0]})"
        return module, size, note
    raise RuntimeError(f"no input size of {sizes} works: {errors[-1]}")


def check_size(module, max_params: float) -> None:
    count = sum(p.numel() for p in module.parameters())
    if max_params and count > max_params:
        raise Skipped(f"{count / 1e6:.0f}M parameters > --max-params")


class TorchExportError(RuntimeError):
    """torch.onnx.export itself failed (the ONNX import was not reached)."""


class Skipped(Exception):
    """A model the sweep does not run; the message says why."""


def randomize_bn(module, seed: int = 1):
    """Random BatchNorm affine parameters and running statistics (fresh ones are
    the identity, which would let a wrong BatchNorm translation pass parity)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for m in module.modules():
        if isinstance(m, batchnorms) and m.running_mean is not None:
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return module


def rel_error(ours, theirs) -> float:
    import numpy as np

    ours = np.asarray(ours, np.float64).reshape(len(theirs), -1)
    theirs = np.asarray(theirs, np.float64).reshape(len(theirs), -1)
    if ours.shape != theirs.shape:
        raise Mismatch(f"output shape {ours.shape}, expected {theirs.shape}")
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def check_close(ours, theirs, what: str) -> dict:
    err = rel_error(ours, theirs)
    if not err <= TOL:
        raise Mismatch(f"{what}: relative error {err:.2e} > {TOL:g}")
    return {"rel_error": err}


class Worker:
    """The stages of one model, in order; ``row`` is rewritten to ``row_file``
    before and after every stage, so the parent knows where a hang happened."""

    def __init__(self, name: str, args, row_file: Path):
        self.name, self.args, self.row_file = name, args, Path(row_file)
        self.row = {"model": name, "stages": {}}
        self.tmp = self.row_file.parent  # the parent's, removed after a timeout too

    def save(self):
        write_text_atomic(self.row_file, json.dumps(self.row))

    def stage(self, stage: str, fn) -> None:
        need = NEEDS.get(stage)
        if need and self.row["stages"].get(need, {}).get("status") != "ok":
            self.row["stages"][stage] = {"status": "skipped", "error": f"needs {need}"}
            return
        self.row["stages"][stage] = {"status": "running"}
        self.save()
        t0 = time.perf_counter()
        try:
            detail = fn() or {}
            entry = {"status": "ok", **detail}
        except Exception as err:
            error = first_line(err).replace(f"{self.tmp}{os.sep}", "")
            entry = {"status": "failed", "error": error}
            if os.environ.get("GAPRUNING_ARCH_TRACEBACK"):
                traceback.print_exc()
        entry["s"] = round(time.perf_counter() - t0, 2)
        self.row["stages"][stage] = entry
        self.save()

    def run(self) -> dict:
        import numpy as np

        try:
            self.module, size, note = build_torch(
                self.name, self.args.sizes, self.args.max_params
            )
        except Skipped as why:
            self.row.update(status="skipped", reason=str(why))
            self.save()
            return self.row
        self.row.update(status="ran", input=size, input_note=note)
        self.row["params_torch"] = sum(p.numel() for p in self.module.parameters())
        rng = np.random.default_rng(0)
        self.x_fw = rng.normal(size=(BATCH, 3, size, size)).astype(np.float32)
        self.x = self.x_fw.transpose(0, 2, 3, 1).copy()
        self.ref = self.torch_out(self.module, self.x_fw)
        self.save()
        for stage in STAGES:
            self.stage(stage, getattr(self, f"_{stage}"))
        return self.row

    # ---------------------------------------------------------------- stages

    @staticmethod
    def torch_out(module, x_fw):
        import torch

        with torch.no_grad():
            return module(torch.from_numpy(x_fw)).numpy()

    @staticmethod
    def ours(pretrained, x):
        import numpy as np
        from flax import nnx

        return np.asarray(nnx.jit(lambda m, v: m(v))(pretrained.model, x))

    def _convert(self):
        import gapruning as gp

        size = self.row["input"]
        self.net = gp.convert.from_torch(
            self.module, input_shape=(size, size, 3), num_classes=10, name=self.name
        )
        space = self.net.space
        return {"groups": len(space.groups), "units": space.num_units}

    def _parity(self):
        return check_close(self.ours(self.net, self.x), self.ref, "logits")

    def _prune(self):
        import gapruning as gp

        result = gp.prune(
            self.net,
            strategy="ga",
            target=0.3,
            budget="flops",
            generations=2,
            population=4,
            num_probes=8,
            seed=0,
            progress=False,
            recover=(),  # the masks are what this stage checks
        )
        self.masks = result.masks
        space = self.net.space
        kept = space.flops(self.masks) / space.dense_flops
        search = result.report()["search"]
        return {"flops_kept": round(float(kept), 4), "search_s": search["seconds"]}

    def _compact(self):
        import gapruning as gp

        self.small = gp.compact(self.net, self.masks)
        masked = gp.masked_apply(self.net, self.masks, self.x)
        self.small_out = self.ours(self.small, self.x)
        detail = check_close(self.small_out, masked, "compacted vs masked outputs")
        params = gp.param_count(self.small)
        want = int(self.net.space.params(self.masks))
        if params != want:
            raise Mismatch(f"compacted model has {params} params, space says {want}")
        return dict(detail, params=params, params_dense=self.net.space.dense_params)

    def _export_torch(self):
        import gapruning as gp

        module = gp.convert.to_torch_module(self.small)
        return check_close(self.torch_out(module, self.x_fw), self.small_out, "torch")

    def _export_onnx(self):
        import gapruning as gp

        path = gp.convert.to_onnx(self.small, self.tmp / "small.onnx")
        return check_close(ort_run(path, self.x_fw), self.small_out, "onnxruntime")

    def _onnx_legacy(self):
        return self.through_onnx(dynamo=False)

    def _onnx_dynamo(self):
        return self.through_onnx(dynamo=True)

    def through_onnx(self, dynamo: bool):
        import torch

        import gapruning as gp

        path = self.tmp / f"torch_{'dynamo' if dynamo else 'legacy'}.onnx"
        kw = {} if dynamo else {"input_names": ["input"], "output_names": ["output"]}
        try:
            torch.onnx.export(
                self.module,
                (torch.from_numpy(self.x_fw),),
                str(path),
                dynamo=dynamo,
                **kw,
            )
        except Exception as err:  # torch's exporter, not gapruning, failed
            raise TorchExportError(f"torch.onnx.export: {first_line(err)}") from None
        net = gp.convert.from_onnx(path)
        return check_close(self.ours(net, self.x), self.ref, "logits")


def ort_run(path, x_fw):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x_fw})[0]


# ------------------------------------------------------------------ the sweep


def run_isolated(name: str, args, log=print) -> dict:
    """One model in a fresh process under ``args.timeout``; a row in any case."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--one", name, "--row-file", str(row_file)]
        cmd += ["--sizes", ",".join(map(str, args.sizes))]
        cmd += ["--max-params", str(args.max_params)]
        # the worker imports gapruning from this checkout, installed or not
        path = [
            str(Path(__file__).resolve().parent.parent),
            os.environ.get("PYTHONPATH"),
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout, env=env
            )
            problem = None if proc.returncode == 0 else last_error(proc.stderr)
        except subprocess.TimeoutExpired:
            problem = f"timed out after {args.timeout:.0f} s"
        row = json.loads(row_file.read_text()) if row_file.exists() else None
    row = row or {"model": name, "stages": {}}
    if problem is not None:
        close_row(row, problem)
    row["total_s"] = round(time.perf_counter() - t0, 1)
    row["timeout_s"] = args.timeout  # rows of a resumed sweep may differ
    log(f"{name}: {summary(row)} ({row['total_s']} s)")
    return row


def last_error(stderr: str) -> str:
    """The last line of a crashed worker's stderr that says something."""
    lines = [s.strip() for s in stderr.strip().splitlines() if s.strip()]
    return f"worker died: {lines[-1][:300]}" if lines else "worker died silently"


def close_row(row: dict, problem: str) -> None:
    """Marks the stage a killed worker was in (or the build) as failed."""
    running = [s for s, e in row["stages"].items() if e.get("status") == "running"]
    if running:
        row["stages"][running[0]] = {"status": "failed", "error": problem}
    elif "status" not in row:
        row.update(status="failed", reason=f"building the torch model: {problem}")
    for stage in STAGES:
        row["stages"].setdefault(stage, {"status": "skipped", "error": problem})


def summary(row: dict) -> str:
    if row.get("status") in ("skipped", "failed"):
        return f"{row['status']}: {row['reason']}"
    ok = [s for s in STAGES if row["stages"].get(s, {}).get("status") == "ok"]
    return f"{len(ok)}/{len(STAGES)} stages ok"


def run(args, log=print) -> dict:
    """The sweep over ``args.models`` (default: every builder), ``args.jobs`` at
    a time; the report is rewritten after every model. With ``args.update`` the
    saved report's other rows are kept (a re-run of some builders); with
    ``args.resume`` the builders it holds are not run again."""
    tv = import_torchvision()
    import torch

    names = family_first(args.models or builders())
    unknown = sorted(set(names) - set(builders()))
    if unknown:
        raise SystemExit(f"unknown torchvision builders: {', '.join(unknown)}")
    out = Path(args.out)
    report = {
        "command": " ".join(["python", "benchmarks/architectures.py", *sys.argv[1:]]),
        "machine": dict(machine(), torch=torch.__version__, torchvision=tv.__version__),
        "settings": {
            "sizes": list(args.sizes),
            "timeout_s": args.timeout,
            "max_params": args.max_params,
            "tolerance": TOL,
            "quick": bool(args.quick),
        },
        "rows": [],
    }
    if args.update or args.resume:
        rerun = [] if args.resume else names
        report = updated(report, out.with_suffix(".json"), rerun)
        done = {r["model"] for r in report["rows"]}
        names = [n for n in names if n not in done]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda n: run_isolated(n, args, log), names):
            report["rows"] = [r for r in report["rows"] if r["model"] != row["model"]]
            report["rows"].append(row)
            report["rows"].sort(key=lambda r: r["model"])
            report["total_s"] = round(time.perf_counter() - t0, 1)
            write_report(report, out)
    return report


def drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def updated(report: dict, saved: Path, names) -> dict:
    """``report`` holding the rows of ``saved`` other than ``names``; the command
    records both runs."""
    if not saved.exists():
        raise SystemExit(f"--update: no saved report {saved}")
    old = json.loads(saved.read_text())
    if drop(old["settings"], "timeout_s") != drop(report["settings"], "timeout_s"):
        raise SystemExit("--update: the saved report used other settings")
    report["rows"] = [r for r in old["rows"] if r["model"] not in names]
    report["command"] = f"{old['command']}; {report['command']}"
    return report


def main(argv=None) -> None:
    args = parse(argv)
    if args.one:
        Worker(args.one, args, Path(args.row_file)).run()
        return
    if args.render_only:  # the .md again from the saved .json
        out = Path(args.out)
        report = json.loads(out.with_suffix(".json").read_text())
        planned = () if report["settings"]["quick"] else builders()
        write_report(report, out, planned)
        return
    report = run(args)
    print(markdown(report))


if __name__ == "__main__":
    main()
