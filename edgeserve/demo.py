"""Build a small random-weight Llama demo model locally, in Hugging Face layout.

Nothing is downloaded: the byte-level BPE tokenizer is trained on docstrings of
standard-library modules, and the weights are seeded random normals. The folder
loads with transformers' ``AutoTokenizer`` / ``AutoModelForCausalLM`` like any
checkpoint written by ``save_pretrained``; only runtime dependencies are used.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger("edgeserve.demo")

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT)
TARGET_VOCAB = 3072

# A fixed list (not sys.modules, whose content depends on what ran before) keeps
# the corpus, hence the tokenizer and config, deterministic for a Python version.
_CORPUS_MODULES = (  # noqa: SIM905 (a word list reads better than 62 quoted items)
    "abc argparse ast asyncio base64 bisect calendar collections configparser contextlib "
    "copy csv dataclasses datetime decimal difflib email.message enum fractions functools "
    "glob gzip hashlib heapq html http.client inspect io ipaddress itertools json logging "
    "math operator os pathlib pickle pprint queue random re shlex shutil socket sqlite3 "
    "statistics string struct subprocess tarfile tempfile textwrap threading time timeit "
    "tokenize unittest urllib.parse uuid warnings zipfile"
).split()

# A little non-ASCII text so that multi-byte characters get merges of their own.
_MULTILINGUAL = (
    "Café, naïve, façade, jalapeño, Straße, smørrebrød. "
    "Привет, мир! Как дела? "
    "你好，世界。我们今天学习语言模型。中文文本测试。 "
    "こんにちは、世界。日本語のテキストです。 "
    "안녕하세요 세계. "
    "مرحبا بالعالم. "
    "Emoji: 😀 😂 🚀 🎉 👍 ❤️ 🌍 ✨ 🔥 🐍\n"
)

# Llama 3 style. Whitespace control (the "-" marks) keeps the template readable
# while rendering without stray newlines under trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{{- message['content'] | trim }}
{{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

_README = """# {name}

A demo model built locally by `edgeserve demo` (seed {seed}).

The weights are **random**: the text this model produces is meaningless. It exists
to exercise loading, scheduling and serving without downloading anything. Its
tokenizer is a real byte-level BPE trained on Python standard-library docstrings,
with Llama 3 special tokens and a Llama 3 style chat template.
"""


def build_demo(
    models_dir: str | Path, name: str = "demo-llama", *, seed: int = 0, force: bool = False
) -> Path:
    """Build the demo model folder ``models_dir/name`` and return its path.

    An existing folder is returned untouched unless ``force`` is true. The model
    is written into a temporary sibling folder and renamed into place, so an
    interrupted build never leaves a half-written model behind.
    """
    models_dir = Path(models_dir)
    target = models_dir / name
    if target.exists() and not force:
        log.info("demo model %s already exists, not rebuilding", target)
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=models_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is ordinary
    try:
        _write_model(tmp, name, seed)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built demo model %s in %.1f s", target, time.perf_counter() - start)
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    # Move the old folder aside first: a rename cannot replace a non-empty folder.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _write_model(folder: Path, name: str, seed: int) -> None:
    log.info("training the demo tokenizer")
    tok = train_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: _token_id(tok, t) for t in SPECIAL_TOKENS}
    config = model_config(tok.get_vocab_size(), ids[BOS], [ids[EOS], ids[EOT]])
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", _generation_config(config))
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(ids))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (folder / "README.md").write_text(_README.format(name=name, seed=seed), encoding="utf-8")
    log.info("writing random weights (seed %d)", seed)
    save_file(random_weights(config, seed), str(folder / "model.safetensors"), {"format": "pt"})


def corpus() -> list[str]:
    """Docstrings of a fixed list of standard-library modules, in a fixed order."""
    docs: list[str] = []
    for mod_name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:  # stripped-down Python builds may lack a few modules
            continue
        docs.extend(_docstrings(module))
    docs.extend([_MULTILINGUAL] * 20)
    return docs


def _docstrings(module: Any) -> list[str]:
    found = [module.__doc__ or ""]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        found.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            found.extend(
                inspect.getdoc(m) or "" for k, m in sorted(vars(obj).items()) if k[0] != "_"
            )
    return [d for d in found if d]


def train_tokenizer(vocab_size: int = TARGET_VOCAB) -> Tokenizer:
    """Train a byte-level BPE tokenizer with Llama 3 special tokens (ids 0-4)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama 3: encode(add_special_tokens=True) prepends <|begin_of_text|>.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def _token_id(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:  # cannot happen: the trainer adds every special token
        raise RuntimeError(f"special token {token} missing from the trained vocabulary")
    return int(token_id)


def model_config(vocab_size: int, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    """The config.json of the demo Llama; vocab rounded up to a multiple of 64."""
    rope_theta = 10000.0
    # Both the transformers 4 keys (torch_dtype, rope_theta, rope_scaling) and the
    # transformers 5 ones (dtype, rope_parameters), so any loader finds its own.
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "dtype": "float32",
        "eos_token_id": eos_ids,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 704,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 8,
        "num_hidden_layers": 4,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": -(-vocab_size // 64) * 64,
    }


def random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded N(0, 0.02) weights with HF Llama names; RMSNorm weights are ones."""
    gen = torch.Generator().manual_seed(seed)
    d, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def normal(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * 0.02

    weights = {"model.embed_tokens.weight": normal(vocab, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(q_out, d)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_out, d)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_out, d)
        weights[p + "self_attn.o_proj.weight"] = normal(d, q_out)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, d)
        weights[p + "mlp.up_proj.weight"] = normal(inter, d)
        weights[p + "mlp.down_proj.weight"] = normal(d, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(d)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(d)
    weights["model.norm.weight"] = torch.ones(d)
    weights["lm_head.weight"] = normal(vocab, d)
    return weights


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "use_cache": True,
    }


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
