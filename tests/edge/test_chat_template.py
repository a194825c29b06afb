"""Chat templates at the edge (edge/chat.py): the ids the edge renders equal ``transformers``
``apply_chat_template`` for several template styles, the sandbox holds, and the chat endpoint says
which format it used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from seamline.edge.chat import CHAT_FILE, ChatFormat, ChatTemplate
from seamline.edge.errors import BadRequest

from .conftest import edge_config

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "[INST]", "[/INST]", "<|turn|>", "<|end|>"]

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- endif %}
{%- endfor %}
"""
# namespace, loop controls, tojson, whitespace control by trim_blocks/lstrip_blocks
FANCY = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}<|turn|>rules {{ m.content | tojson }}<|end|>
{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
<|turn|>{{ ns.n }} {{ m.role }}: {{ m.content }}<|end|>
{% endfor %}
{% if add_generation_prompt %}<|turn|>assistant:{% endif %}"""

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse. Use <b>bold</b> & \"quotes\"."},
     {"role": "user", "content": "Who is Romeo?"},
     {"role": "assistant", "content": "A Montague.  "},
     {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Juliet?"}]}],
    [{"role": "user", "content": "One turn, no system."}],
    [{"role": "system", "content": "Sys."}, {"role": "user", "content": "a\n\nb"},
     {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"},
     {"role": "assistant", "content": "e"}, {"role": "user", "content": "ünïcödé 日本"}],
]


def model_folder(out: Path, template: str, eos: str = "</s>") -> Path:
    """A tokenizer folder as a hub checkpoint has it: tokenizer.json (MiniLM's WordPiece, which adds
    [CLS]/[SEP] on its own) with the template's special tokens, and tokenizer_config.json."""
    from seamline.testing.models import minilm_dir
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos,
        "unk_token": "[UNK]", "pad_token": "[PAD]", "chat_template": template}))
    return out


def edge_tokenizer(path: Path):
    """The tokenizer as EdgeRuntime loads it (MiniLM's file pads to 128 otherwise)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def edge_and_hf(folder: Path):
    from transformers import AutoTokenizer

    template = ChatTemplate.from_model_folder(folder, folder / "tokenizer.json")
    assert template is not None
    return ChatFormat(template, edge_tokenizer(folder / "tokenizer.json")), AutoTokenizer.from_pretrained(folder)


def hf_ids(hf, messages) -> list[int]:
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def plain_messages(messages):
    """transformers wants text content; the edge joins text parts itself."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in messages]


@pytest.mark.parametrize("name,template", [("chatml", CHATML), ("llama3", LLAMA3), ("fancy", FANCY)])
def test_rendered_ids_equal_apply_chat_template(tmp_path, name, template):
    chat, hf = edge_and_hf(model_folder(tmp_path / name, template))
    for messages in CONVERSATIONS:
        prompt = chat.prompt(messages)
        assert prompt.text == hf.apply_chat_template(plain_messages(messages), add_generation_prompt=True,
                                                     tokenize=False)
        assert chat.encode(prompt) == hf_ids(hf, plain_messages(messages))
        assert prompt.format == "template" and prompt.stop == ()


def test_mistral_template_and_its_own_refusal(tmp_path):
    chat, hf = edge_and_hf(model_folder(tmp_path / "mistral", MISTRAL))
    for messages in CONVERSATIONS:
        assert chat.encode(chat.prompt(messages)) == hf_ids(hf, plain_messages(messages))
    with pytest.raises(BadRequest, match="refused the conversation: Conversation roles must alternate"):
        chat.prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_end_of_turn_tokens_are_stops(tmp_path):
    folder = model_folder(tmp_path / "llama3", LLAMA3)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    template = ChatTemplate.from_model_folder(folder, folder / "tokenizer.json")
    vocab = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    # generation_config's ids, the eos token, and the end-of-turn token the template writes
    assert template.stop_token_ids == (7, 8, ids["</s>"], ids["<|eot_id|>"])
    assert template.special_tokens["eos_token"] == "</s>"
    # the older tokenizer_config.json layout stores special tokens as AddedToken objects
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "</s>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_model_folder(folder, folder / "tokenizer.json") == template
    again = ChatTemplate.from_json(template.to_json())
    assert again == template


def test_the_sandbox_holds():
    for source in ("{{ messages.append(1) }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(BadRequest, match="unsafe|refused"):
            ChatFormat(ChatTemplate(source)).prompt([{"role": "user", "content": "hi"}])


def test_bad_messages_are_400():
    chat = ChatFormat(ChatTemplate(CHATML))
    for messages in ([], "hi", [{"content": "no role"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(BadRequest):
            chat.prompt(messages)


def test_no_template_keeps_the_plain_format(tmp_path):
    folder = model_folder(tmp_path / "base", "")
    assert ChatTemplate.from_model_folder(folder, folder / "tokenizer.json") is None
    prompt = ChatFormat(None).prompt([{"role": "user", "content": "Hi"}])
    assert prompt.format == "plain" and prompt.text.endswith("Assistant:") and "\nUser:" in prompt.stop


def test_chat_endpoint_says_which_format(agent):
    """The tiny GPT-2 has no template: the plain format, and the response says so."""
    r = httpx.post(agent.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["seamline"]["chat_format"] == "plain"


def test_chat_endpoint_renders_the_bundles_template(full_bundle, cloud, start_agent, tmp_path):
    """A bundle carrying a template: the agent renders it, tokenizes without the tokenizer's own [CLS]/[SEP],
    and answers through the cloud."""
    from seamline.protos.bundle import load_bundle, write_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(full_bundle, bundle)
    m = load_bundle(bundle)
    template = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}", stop_token_ids=(102,))
    (bundle / CHAT_FILE).write_text(template.to_json())
    m.chat_template = CHAT_FILE
    write_manifest(m, bundle)
    agent = start_agent(edge_config(bundle, [cloud.address]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = httpx.post(agent.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 3,
                                                             "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = ChatFormat(template, edge_tokenizer(bundle / "tokenizer.json"))
    ids = expected.encode(expected.prompt(messages))
    assert body["seamline"]["chat_format"] == "template" and body["usage"]["prompt_tokens"] == len(ids)
    r = httpx.post(agent.url + "/v1/chat/completions", json={"messages": "nope"}, timeout=60)
    assert r.status_code == 400 and "messages" in r.text
