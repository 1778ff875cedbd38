"""`nanoseek serve` on a model directory whose tokenizer nanoseek did not make (ChatML, Llama-3):
start-up, a chat completion through the real `openai` client, and the prompt the server built
is the one transformers renders."""

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
transformers = pytest.importorskip("transformers")

# ruff: noqa: E402
import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import SamplingParams
from nanoseek.serve.app import create_app
from nanoseek.serve.loading import load_engine
from nanoseek.serve.server import ServerThread
from tests.helpers import random_model, tiny_config
from tests.hf_tokenizers import build

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 2+3"}]


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_openai_client_chat_on_a_foreign_tokenizer(tmp_path, kind):
    tok_dir = build(kind, tmp_path / "tok")
    tok = Tokenizer.load(tok_dir)
    model_dir = tmp_path / "model"
    extra = [tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"]
    cfg = tiny_config(vocab_size=-(-tok.vocab_size // 64) * 64, eos_token_id=tok.eos_id)
    nanoseek.save(random_model(cfg), model_dir, extra_files=extra)

    engine, loaded = load_engine(str(model_dir), max_batch_size=2, max_seq_len=256)
    assert set(loaded.stop_ids) <= engine.eos_ids and len(loaded.stop_ids) == 2
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    prompt = hf.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    want = engine.generate([loaded.encode(prompt)], SamplingParams(max_new_tokens=8))[0]

    server = ServerThread(create_app(engine, loaded, "m", disconnect_poll_s=0.05)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0)
    finally:
        server.stop()
    (choice,) = r.choices
    assert r.usage.prompt_tokens == len(loaded.encode(prompt))  # transformers' prompt
    assert r.usage.completion_tokens == len(want.token_ids)
    assert choice.finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    text = (choice.message.content or "") + (
        choice.message.model_extra.get("reasoning_content") or ""
    )
    assert "<|im_start|>" not in text and "<|start_header_id|>" not in text
