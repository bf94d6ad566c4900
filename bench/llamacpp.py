"""llama.cpp beside edgeserve's benchmarks: `llama-bench` and `llama-batched-bench` runs.

Both are found on PATH or through $LLAMA_BENCH / $LLAMA_BATCHED_BENCH, and run over GGUF
files given as `LABEL=file.gguf,...`; without the program or the files each returns {}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

# edgeserve's variant -> the GGUF labels of the same precision (first found wins).
PEERS = {"fp32": ("F32",), "bf16": ("BF16", "F16"), "int8": ("Q8_0",),
         "int4": ("Q4_0", "Q4_1")}


def program(name: str, env: str) -> str | None:
    return os.environ.get(env) or shutil.which(name)


def files(spec: str) -> dict[str, Path]:
    """`LABEL=file.gguf,...` -> label: path."""
    out = {}
    for item in filter(None, spec.split(",")):
        label, _, file = item.partition("=")
        if not file:
            raise SystemExit(f"--gguf wants LABEL=file.gguf, got {item!r}")
        out[label] = Path(file)
    return out


def env_for(exe: str) -> dict[str, str]:
    """The program's own folder on the library path (a build tree's shared libraries)."""
    env = dict(os.environ)
    folder = str(Path(exe).resolve().parent)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [folder, env.get("LD_LIBRARY_PATH")]))
    return env


def bench(spec: str, tokens: int, threads: int) -> dict[str, dict[str, float]]:
    """llama-bench: prefill (512 tokens) and one-stream decode tokens/s, and bytes."""
    exe = program("llama-bench", "LLAMA_BENCH")
    if not exe or not spec:
        return {}
    out: dict[str, dict[str, float]] = {}
    for label, file in files(spec).items():
        run = subprocess.run([exe, "-m", str(file), "-p", "512", "-n", str(tokens), "-t",
                              str(threads), "-o", "json"], capture_output=True, text=True,
                             check=True, env=env_for(exe))
        rows = json.loads(run.stdout)
        out[label] = {("prefill_512_tok_s" if r["n_prompt"] else "decode_1_tok_s"):
                      round(float(r["avg_ts"]), 1) for r in rows}
        out[label]["bytes"] = int(rows[0]["model_size"])
    return out


def batched(spec: str, tokens: int, threads: int, streams: tuple[int, ...] = (1, 8, 32),
            prompt: int = 8) -> dict[str, dict[str, float]]:
    """llama-batched-bench: decode (TG) tokens/s over all streams, per stream count, each
    stream `prompt` tokens of prompt then `tokens` generated: the time of the generation
    steps only, like edgeserve's decode figure."""
    exe = program("llama-batched-bench", "LLAMA_BATCHED_BENCH")
    if not exe or not spec:
        return {}
    context = max(streams) * (prompt + tokens) + 64
    out: dict[str, dict[str, float]] = {}
    for label, file in files(spec).items():
        run = subprocess.run([exe, "-m", str(file), "-c", str(context), "-npp", str(prompt),
                              "-ntg", str(tokens), "-npl", ",".join(map(str, streams)),
                              "-t", str(threads), "--output-format", "jsonl"],
                             capture_output=True, text=True, check=True, env=env_for(exe))
        rows = [json.loads(line) for line in run.stdout.splitlines()
                if line.startswith("{") and '"speed_tg"' in line]
        out[label] = {f"decode_{r['pl']}_tok_s": round(float(r["speed_tg"]), 1) for r in rows}
    return out
