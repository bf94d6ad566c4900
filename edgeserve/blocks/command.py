"""`edgeserve tasks pack BASE FINETUNED... [--block 64] [--budget 10%] [--models DIR]
[--name ID] [--no-align]`: build task packs into the model store and report their error."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeserve.blocks.pack import TaskPack, is_task_dir, parse_block
from edgeserve.config import Config, format_size
from edgeserve.store import ModelStore, UnknownModel


def parse_budget(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a fraction or a percentage "
                                         f"(e.g. 0.1 or 10%)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget {text!r} must be above 0 and at most 100%")
    return value


def _block(text: str) -> tuple[int, int]:
    try:
        return parse_block(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction, cfg: Config) -> None:
    tasks = sub.add_parser("tasks", help="task packs: one base model, many block-sparse tasks")
    verbs = tasks.add_subparsers(dest="verb", required=True, metavar="VERB")
    pack = verbs.add_parser(
        "pack", help="pack fine-tuned checkpoints or LoRA adapters of BASE as tasks",
        description="Each FINETUNED folder (a Hugging Face checkpoint of BASE, or a PEFT "
                    "LoRA adapter) becomes a task pack in the store, served under its "
                    "folder name: the base plus the blocks that changed most.")
    pack.add_argument("base", metavar="BASE", help="the base model: an id of the store")
    pack.add_argument("finetuned", metavar="FINETUNED", nargs="+", type=Path,
                      help="fine-tuned model folders or LoRA adapter folders")
    pack.add_argument("--block", type=_block, default=(64, 64), metavar="N|RxC",
                      help="block size (default: 64, i.e. 64x64)")
    pack.add_argument("--budget", type=parse_budget, default=0.1, metavar="FRACTION",
                      help="blocks a task keeps, as a share of the linear weights' blocks "
                           "(default: 10%%)")
    pack.add_argument("--models", default=str(cfg.models), metavar="DIR",
                      help="the model store (default: %(default)s)")
    pack.add_argument("--name", action="append", default=None, metavar="ID",
                      help="task id, once per FINETUNED in order (default: folder names)")
    pack.add_argument("--no-align", dest="aligned", action="store_false",
                      help="choose each task's blocks on its own (no shared blocks)")
    pack.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                      default="info", help="(default: %(default)s)")
    pack.set_defaults(func=run_pack)


def _base(store: ModelStore, text: str) -> Path:
    """BASE as an id of the store, or as the path of a model folder inside it."""
    try:
        path = store.path(text)
    except UnknownModel:
        path = Path(text)
        if path.is_dir() and path.resolve().parent == store.root.resolve():
            return store.path(path.name)
        raise ValueError(f"base {text!r} is not a model of the store {store.root} (tasks are "
                         f"served over a base in the same store; see --models)") from None
    if is_task_dir(path):
        raise ValueError(f"base {text!r} is a task pack, not a model: pack over its base "
                         f"'{TaskPack.read(path).base}'")
    return path


def run_pack(args: argparse.Namespace) -> int:
    from edgeserve.blocks.build import pack_tasks

    store = ModelStore(args.models)
    if args.name is not None and len(args.name) != len(args.finetuned):
        raise ValueError(f"--name given {len(args.name)} times for "
                         f"{len(args.finetuned)} fine-tuned folders")
    base = _base(store, args.base)
    reports = pack_tasks(base, list(args.finetuned), store.root, block=args.block,
                         budget=args.budget, aligned=args.aligned, names=args.name)
    print(f"{'task':24} {'blocks':>7} {'shared':>7} {'zero':>6} {'vectors':>7} {'size':>10} "
          f"{'change err':>10} {'weight err':>10}")
    for r in reports:
        print(f"{r.task:24} {r.blocks:7d} {r.shared_blocks:7d} {r.zero_blocks:6d} "
              f"{r.vectors:7d} {format_size(r.bytes):>10} {r.change_error:10.4f} "
              f"{r.weight_error:10.4f}")
        for name, change in sorted(r.unpacked.items()):
            print(f"  not packed (served as the base's): {name} differs by {change:.2e}")
    return 0
