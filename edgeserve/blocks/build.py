"""`edgeserve tasks pack`: task packs from fine-tuned checkpoints or LoRA adapters of a base.

Three passes over the weights, one tensor at a time (a whole model is never in memory):
energies of every task's change per block; (aligned) the shared consensus blocks; then
the chosen blocks, written as one pack per task. See select.py for the choice itself.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from edgeserve.arch.plan import HEAD
from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.pack import (
    SAFETENSORS_DTYPES,
    PackedWeight,
    TaskPack,
    block_key,
    parse_block,
)
from edgeserve.blocks.select import (
    Selection,
    SharedCandidate,
    agree,
    budget_blocks,
    candidates,
    errors,
    marginals,
    select_aligned,
    select_unaligned,
)
from edgeserve.blocks.sources import Checkpoint, WeightSource, is_buffer, open_source
from edgeserve.blocks.targets import Target, linear_targets, vector_targets
from edgeserve.blocks.task import base_fingerprint
from edgeserve.checkpoint import HashCache
from edgeserve.loader import read_spec
from edgeserve.store import valid_id

log = logging.getLogger("edgeserve.blocks")
CONSENSUS_BYTES = 256 << 20     # float64 working set when aligning one weight's blocks
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "generation_config.json")


@dataclass(slots=True)
class PackReport:
    task: str
    path: Path
    blocks: int                    # blocks stored (changed), shared ones included
    shared_blocks: int             # of those, consensus blocks other tasks use too
    zero_blocks: int
    bytes: int                     # block bytes in the pack's dtype
    change_error: float            # |lost change| / |change| over the packed weights
    weight_error: float            # |lost change| / |fine-tuned weights|
    unpacked: dict[str, float] = field(default_factory=dict)  # other tensors that differ
    vectors: int = 0               # norm weights and biases it changed, kept whole


@dataclass(slots=True)
class _Grid:
    name: str
    rows: int                      # row blocks
    cols: int                      # column blocks
    offset: int                    # first global position


def blocks_of(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C) -> (P, br * bc), position p = row block * column blocks + column block."""
    (r, c), (br, bc) = w.shape, block
    return w.reshape(r // br, br, c // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)


def pack_tasks(base_dir: Path, finetuned: list[Path], store: Path, *,
               block: tuple[int, int] | int | str = (64, 64), budget: float = 0.1,
               aligned: bool = True, names: list[str] | None = None) -> list[PackReport]:
    block = parse_block(block)
    spec = read_spec(base_dir)
    base = Checkpoint(base_dir)
    ids = names or [d.name for d in finetuned]
    if len(ids) != len(finetuned):
        raise ValueError(f"{len(ids)} task ids for {len(finetuned)} fine-tuned folders")
    _check_ids(ids, base_dir.name, store)
    sources = [open_source(d, base, spec) for d in finetuned]
    targets = {n: t for n, t in linear_targets(spec).items() if n in base.tensors}
    grids = _grids(targets, block)
    dtypes = {src.dtype(n) for src in sources for n in targets}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtype not in SAFETENSORS_DTYPES:
        dtype = torch.float32
    total = sum(g.rows * g.cols for g in grids)
    k = budget_blocks(budget, total)

    e, zero, change, weight = _energies(base, sources, grids, block)
    shared: dict[int, torch.Tensor] = {}
    residual: dict[tuple[int, int], float] = {}
    if aligned:
        cands = _consensus(base, sources, grids, block, dtype, marginals(e, zero, k),
                           e, zero, shared, residual)
        sel = select_aligned(e, zero, k, cands)
    else:
        sel = select_unaligned(e, zero, k)
    lost = errors(e, zero, sel, residual)
    vectors = _vectors(base, sources, [n for n in vector_targets(spec) if n in base.tensors])
    unserved = {HEAD} if spec.tie_embeddings else set()   # a tied base's head
    unpacked = _unpacked(base, sources,
                         {g.name for g in grids} | set(vector_targets(spec)) | unserved)
    fingerprint = base_fingerprint(base_dir, spec, HashCache(store))
    change_error = [math.sqrt(lost[t] / change[t]) if change[t] > 0 else 0.0
                    for t in range(len(ids))]
    weight_error = [math.sqrt(lost[t] / weight[t]) if weight[t] > 0 else 0.0
                    for t in range(len(ids))]
    error = [{"change_error": change_error[t], "weight_error": weight_error[t],
              "unpacked": unpacked[t]} for t in range(len(ids))]
    packs = _write(base, sources, ids, grids, block, dtype, sel, zero, shared, store,
                   base_dir.name, budget, aligned, fingerprint, error, vectors)
    reports = []
    for t, (pack, folder) in enumerate(packs):
        reports.append(PackReport(
            pack.id, folder, pack.num_blocks, len(sel.shared[t]),
            sum(len(w.zero) for w in pack.weights.values()),
            pack.num_blocks * block[0] * block[1] * dtype.itemsize, change_error[t],
            weight_error[t], unpacked[t], len(pack.vectors)))
        if unpacked[t]:
            log.warning("%s: %d tensors that packs do not cover differ from the base and "
                        "are served as the base's: %s", pack.id, len(unpacked[t]),
                        ", ".join(sorted(unpacked[t])[:4]))
    return reports


def _check_ids(ids: list[str], base_id: str, store: Path) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"task ids repeat: {ids}")
    for task in ids:
        if not valid_id(task) or task == base_id:
            raise ValueError(f"{task!r} cannot be a task id (letters, digits, '._:+-'; "
                             f"not the base's id)")
        if (store / task / "config.json").is_file():
            raise FileExistsError(f"{store / task} is a model, not a task pack: choose "
                                  f"another id")


def _grids(targets: dict[str, Target], block: tuple[int, int]) -> list[_Grid]:
    """The block grid of every weight the block tiles; the others come from the base (and a
    change there is reported as unpacked)."""
    grids, offset, untiled = [], 0, []
    for name, target in targets.items():
        rows, cols = target.shape
        if rows % block[0] or cols % block[1] or target.row % block[0]:
            untiled.append(name)
            continue
        grids.append(_Grid(name, rows // block[0], cols // block[1], offset))
        offset += (rows // block[0]) * (cols // block[1])
    if not grids:
        raise ModelFormatError(f"block {block[0]}x{block[1]} tiles none of the linear weights; "
                               f"choose a block whose sides divide their rows and columns")
    if untiled:
        log.warning("block %dx%d does not tile %d weights (e.g. %s): they are not packed",
                    block[0], block[1], len(untiled), untiled[0])
    return grids


def _load(src: WeightSource, name: str, shape: torch.Size) -> torch.Tensor:
    w = src.get(name)
    if w.shape != shape:
        raise ModelFormatError(f"{src.name}: '{name}' has shape {tuple(w.shape)}, the base "
                               f"{tuple(shape)}: not a fine-tune of this base")
    return w


def _as_saved(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base's tensor as a fine-tune saved in dtype holds it unchanged: rounding it to a
    coarser dtype (a bf16 fine-tune of an fp32 base) is no change."""
    return w if w.dtype == dtype else w.to(dtype)


def _energies(base: Checkpoint, sources: list[WeightSource], grids: list[_Grid],
              block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[float],
                                                list[float]]:
    """e and zero (T, G); per task the squared norm of its change and of its weights."""
    total = grids[-1].offset + grids[-1].rows * grids[-1].cols if grids else 0
    e = torch.zeros(len(sources), total, dtype=torch.float64)
    zero = torch.zeros(len(sources), total, dtype=torch.bool)
    change, weight = [0.0] * len(sources), [0.0] * len(sources)
    for g in tqdm(grids, desc="measuring changes", unit="weight", disable=None):
        w = base.get(g.name)
        wb = blocks_of(w.to(torch.float64), block)
        base_nonzero = (wb != 0).any(-1)
        span = slice(g.offset, g.offset + g.rows * g.cols)
        for t, src in enumerate(sources):
            ft_w = _load(src, g.name, w.shape)
            ref = wb if ft_w.dtype == w.dtype else \
                blocks_of(_as_saved(w, ft_w.dtype).to(torch.float64), block)
            ft = blocks_of(ft_w.to(torch.float64), block)
            e[t, span] = (ft - ref).pow(2).sum(-1)
            zero[t, span] = ~(ft != 0).any(-1) & base_nonzero
            change[t] += float(e[t, span].sum())
            weight[t] += float(ft.pow(2).sum())
    return e, zero, change, weight


def _consensus(base: Checkpoint, sources: list[WeightSource], grids: list[_Grid],
               block: tuple[int, int], dtype: torch.dtype, m: torch.Tensor, e: torch.Tensor,
               zero: torch.Tensor, shared: dict[int, torch.Tensor],
               residual: dict[tuple[int, int], float]) -> list[SharedCandidate]:
    """Shared candidates (their tiles into shared, members' losses into residual)."""
    out: list[SharedCandidate] = []
    for g in tqdm(grids, desc="aligning tasks", unit="weight", disable=None):
        shape = torch.Size(base.tensors[g.name].shape)
        span = slice(g.offset, g.offset + g.rows * g.cols)
        changed = candidates(e[:, span], zero[:, span])                  # (T, P)
        if int(changed.sum(0).max()) < 2:
            continue
        ft = torch.stack([blocks_of(_load(s, g.name, shape), block) for s in sources])
        step = max(1, CONSENSUS_BYTES // (ft.shape[0] * ft.shape[2] * 8))
        for lo in range(0, ft.shape[1], step):       # positions in slices: bounded memory
            part = slice(lo, lo + step)
            out += agree(ft[:, part].to(torch.float64), changed[:, part],
                          e[:, span][:, part], m[:, None], dtype, block, g.offset + lo,
                          shared, residual)
    return out


def _vectors(base: Checkpoint, sources: list[WeightSource], names: list[str]
             ) -> list[dict[str, torch.Tensor]]:
    """Per task: the 1-D tensors (norm weights, biases) it changed, whole, as saved (in
    float32 where the pack format has no such dtype)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in sources]
    for name in names:
        w = base.get(name)
        for t, src in enumerate(sources):
            v = _load(src, name, w.shape)
            if not torch.equal(v, _as_saved(w, v.dtype)):
                keep = v.dtype if v.dtype in SAFETENSORS_DTYPES else torch.float32
                out[t][name] = v.to(keep).contiguous()
    return out


def _unpacked(base: Checkpoint, sources: list[WeightSource], packed: set[str]
              ) -> list[dict[str, float]]:
    """Per task: tensors outside the packed weights that differ from the base
    (name -> relative change); they are served as the base's."""
    out: list[dict[str, float]] = [{} for _ in sources]
    for name in sorted(n for n in base.names() - packed if not is_buffer(n)):
        w = base.get(name)
        for t, src in enumerate(sources):
            ft = _load(src, name, w.shape)
            ref = _as_saved(w, ft.dtype).to(torch.float64)
            if not torch.equal(ft.to(torch.float64), ref):
                out[t][name] = float((ft.to(torch.float64) - ref).norm()
                                     / ref.norm().clamp(min=1e-30))
    return out


def _write(base: Checkpoint, sources: list[WeightSource], ids: list[str], grids: list[_Grid],
           block: tuple[int, int], dtype: torch.dtype, sel: Selection, zero: torch.Tensor,
           shared: dict[int, torch.Tensor], store: Path, base_id: str, budget: float,
           aligned: bool, fingerprint: str, error: list[dict[str, object]],
           vectors: list[dict[str, torch.Tensor]]) -> list[tuple[TaskPack, Path]]:
    """One pack per task, a task at a time (only its blocks are in memory at once)."""
    out = []
    for t, task in enumerate(tqdm(ids, desc="writing packs", unit="task", disable=None)):
        tiles: dict[str, torch.Tensor] = {}
        weights: dict[str, PackedWeight] = {}
        for g in grids:
            span = range(g.offset, g.offset + g.rows * g.cols)
            own = sorted(p for p in sel.own[t] if p in span)
            common = sorted(p for p in sel.shared[t] if p in span)
            zeros = zero[t, g.offset:g.offset + g.rows * g.cols].nonzero().flatten().tolist()
            if not (own or common or zeros):
                continue
            ft = blocks_of(_load(sources[t], g.name, torch.Size(base.tensors[g.name].shape)),
                           block) if own else None
            listed = []
            for pos in own + common:
                tile = shared[pos] if pos in sel.shared[t] else \
                    ft[pos - g.offset].to(dtype).reshape(block)   # type: ignore[index]
                key = block_key(tile)
                tiles[key] = tile
                p = pos - g.offset
                listed.append((p // g.cols, p % g.cols, key))
            weights[g.name] = PackedWeight(
                (g.rows * block[0], g.cols * block[1]), tuple(sorted(listed)),
                tuple((p // g.cols, p % g.cols) for p in zeros))
        folder = store / task
        keyed = {name: block_key(v) for name, v in vectors[t].items()}
        tiles |= {keyed[name]: v for name, v in vectors[t].items()}
        pack = TaskPack(task, base_id, block, str(dtype).removeprefix("torch."), weights,
                        budget, aligned, error[t], fingerprint, keyed)
        pack.write(folder, tiles, first={block_key(shared[p]) for p in sel.shared[t]})
        _copy_tokenizer(getattr(sources[t], "folder", None), folder)
        out.append((pack, folder))
    return out


def _copy_tokenizer(src_dir: Path | None, folder: Path) -> None:
    """The fine-tune's tokenizer files into the pack; a previous pack's that it lacks go (the
    base's are used instead). The fine-tune may be the pack's own folder (an adapter kept in
    the store under the task's id)."""
    for name in COPIED:
        src, dst = (src_dir / name if src_dir is not None else None), folder / name
        if src is not None and src.is_file():
            if not dst.exists() or not src.samefile(dst):
                shutil.copyfile(src, dst)
        elif dst.is_file():
            dst.unlink()
