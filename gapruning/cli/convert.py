"""``gapruning convert``: import a PyTorch, Keras or ONNX model."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .common import UsageError, check_new_dir, floats, ints


def add_parser(sub) -> None:
    c = sub.add_parser(
        "convert", help="import a PyTorch, Keras or ONNX model as a gapruning model"
    )
    c.add_argument(
        "--from", dest="source", required=True, choices=("torch", "keras", "onnx")
    )
    c.add_argument("file", help=".pt/.pth/.safetensors, .h5/.keras or .onnx file")
    c.add_argument("--arch", help="zoo architecture to map a torch state dict onto")
    c.add_argument("--num-classes", type=int, help="classes of the zoo architecture")
    c.add_argument(
        "--arch-arg", action="append", help="KEY=VALUE for the zoo builder, repeatable"
    )
    c.add_argument("--input-shape", type=ints, help="H,W,C (or F) as the model takes")
    c.add_argument(
        "--input-box",
        type=floats,
        help="LOW,HIGH: range of valid model inputs (--input-box=-1,1 if LOW < 0)",
    )
    c.add_argument("--name", help="model name for the card")
    c.add_argument("--out", required=True, help="output model directory")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=run)


def run(args) -> None:
    """Converts ``args.file`` and saves it as a model directory ``args.out``."""
    from .. import convert, zoo

    out = Path(args.out)
    check_new_dir(out, args.overwrite)
    kwargs = {"name": args.name} if args.name else {}
    if args.input_shape:
        kwargs["input_shape"] = args.input_shape
    if args.input_box:
        if len(args.input_box) != 2:
            raise UsageError(f"--input-box takes LOW,HIGH, got {args.input_box}")
        kwargs["input_box"] = args.input_box
    arch_kwargs = {}
    for item in args.arch_arg or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--arch-arg takes KEY=VALUE, got {item!r}")
        try:
            arch_kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            arch_kwargs[key] = value
    if args.num_classes is not None:
        arch_kwargs["num_classes"] = args.num_classes
    if args.source == "torch":
        net = convert.from_torch(args.file, arch=args.arch, **kwargs, **arch_kwargs)
    else:
        if args.arch or arch_kwargs:
            raise UsageError("--arch/--num-classes/--arch-arg apply to --from torch")
        reader = convert.from_keras if args.source == "keras" else convert.from_onnx
        net = reader(args.file, **kwargs)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    net.card["origin"]["command"] = "gapruning " + shlex.join(argv)
    zoo.save(net, out, overwrite=args.overwrite)
    box = net.card["input"]["box"]
    default = net.card["input"]["box_source"] == "default"
    note = " (default: pass --input-box)" if default else ""
    print(
        f"saved {out}: {args.source} model {args.file}, input "
        f"{tuple(net.input_shape)} in [{box[0]:g}, {box[1]:g}]{note}, "
        f"{len(net.model.masks)} prunable groups"
    )
