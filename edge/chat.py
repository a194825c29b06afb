"""Chat prompts at the edge: the model's own chat template, rendered without ``transformers``.

``partition`` copies the model's template (``chat_template`` in tokenizer_config.json, or
chat_template.jinja / chat_template.json beside it) into the bundle as ``chat_template.json``,
with the special tokens the template may name (``bos_token``, ``eos_token``, ...) and the token
ids that end an assistant turn (the end-of-turn / end-of-text tokens). The agent renders it with
``jinja2`` in an ``ImmutableSandboxedEnvironment`` set up as ``transformers`` sets its own up
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a
``tojson`` that does not escape HTML), then tokenizes the text with ``add_special_tokens=False``
(the template writes them), so the ids equal ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)``. Generation stops at the end-of-turn token.

A model without a template (a base model) gets the plain ``Role: content`` format of
``text.chat_prompt``; every chat response names the format it used (``seamline.chat_format``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import BadRequest
from .text import CHAT_STOP, chat_prompt, normalize_messages

CHAT_FILE = "chat_template.json"
TEMPLATE, PLAIN = "template", "plain"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Tokens that end a turn in the common templates; one counts only when the template writes it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|endoftext|>",
               "<|end_of_text|>", "</s>", "<|return|>")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template with what it needs to render and where a turn ends."""

    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token/... -> its text
    stop_token_ids: tuple[int, ...] = ()
    source: str = ""  # the file it came from

    # -- bundle file ---------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"template": self.template, "special_tokens": self.special_tokens,
                           "stop_token_ids": list(self.stop_token_ids), "source": self.source}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = CHAT_FILE) -> ChatTemplate:
        try:
            d = json.loads(text)
            template = d["template"]
            special = {str(k): str(v) for k, v in (d.get("special_tokens") or {}).items()}
            stops = tuple(int(i) for i in d.get("stop_token_ids") or ())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: not a chat template file ({type(e).__name__}: {e}); re-run `partition`"
                             ) from None
        if not isinstance(template, str) or not template:
            raise ValueError(f"{where}: the template is empty; re-run `partition`")
        return cls(template, special, stops, str(d.get("source", "")))

    # -- partition time ------------------------------------------------------------------
    @classmethod
    def from_model_folder(cls, folder: Path, tokenizer_json: Path) -> ChatTemplate | None:
        """The template of a Hugging Face checkpoint folder, or None for a model without one."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        template, source = _find_template(folder, config)
        if template is None:
            return None
        special = {}
        specials_map = _read_json(folder / "special_tokens_map.json")
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_text(config.get(name)) or _token_text(specials_map.get(name))
            if value:
                special[name] = value
        vocab = _added_tokens(tokenizer_json)
        stops: list[int] = []
        gen = _read_json(folder / "generation_config.json")
        eos = gen.get("eos_token_id", _read_json(folder / "config.json").get("eos_token_id"))
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in stops:
                stops.append(i)
        for text in [special.get("eos_token"), *END_OF_TURN]:
            wanted = text and text in vocab and (text == special.get("eos_token") or text in template)
            if wanted and vocab[text] not in stops:
                stops.append(vocab[text])
        return cls(template, special, tuple(stops), source)

    # -- rendering -----------------------------------------------------------------------
    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """OpenAI chat messages -> the prompt text; BadRequest for what the template refuses."""
        import jinja2

        try:
            return _compile(self.template).render(messages=normalize_messages(messages), tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.SecurityError as e:
            raise BadRequest(f"the model's chat template did something unsafe and was stopped ({e})",
                             "messages") from None
        except jinja2.exceptions.TemplateError as e:
            raise BadRequest(f"the model's chat template refused the conversation: {e}", "messages") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise BadRequest(f"the model's chat template failed on these messages ({type(e).__name__}: {e}); "
                             "check the roles and contents", "messages") from None


MAX_TEMPLATE_BYTES = 1 << 20


def load_chat_template(bundle_dir: Path, name: str | None) -> ChatTemplate | None:
    """The bundle's template file (``manifest.chat_template``), or None when the bundle has none."""
    from seamline.protos.bundle import BundleError, bundle_file

    if not name:
        return None
    path = bundle_file(bundle_dir, name, MAX_TEMPLATE_BYTES)
    try:
        return ChatTemplate.from_json(path.read_text(encoding="utf-8"), str(Path(bundle_dir) / name))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(str(e)) from None


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stop: tuple[str, ...]           # stop strings
    stop_token_ids: tuple[int, ...]
    format: str                     # TEMPLATE | PLAIN
    special_tokens: bool            # tokenize with the tokenizer's own special tokens (plain format)


class ChatFormat:
    """How this agent turns chat messages into a prompt: the bundle's template, else the plain format.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the bundle's tokenizer.json)."""

    def __init__(self, template: ChatTemplate | None, tokenizer=None):
        self.template = template
        self.tokenizer = tokenizer

    @classmethod
    def for_runtime(cls, runtime) -> ChatFormat:
        """The format of an ``EdgeRuntime``'s bundle (BundleError for a damaged template file)."""
        return cls(load_chat_template(runtime.bundle_dir, runtime.manifest.chat_template), runtime.tokenizer)

    def encode(self, prompt: ChatPrompt) -> list[int]:
        """Token ids of a rendered prompt: a template writes its special tokens itself."""
        return self.tokenizer.encode(prompt.text, add_special_tokens=prompt.special_tokens).ids

    @property
    def name(self) -> str:
        return TEMPLATE if self.template is not None else PLAIN

    def prompt(self, messages: Any) -> ChatPrompt:
        if self.template is None:
            return ChatPrompt(chat_prompt(messages), CHAT_STOP, (), PLAIN, True)
        return ChatPrompt(self.template.render(messages), (), self.template.stop_token_ids, TEMPLATE, False)


_COMPILED: dict[str, Any] = {}


def _compile(template: str):
    """The template in a sandbox set up like ``transformers``' own (one compiled copy per template)."""
    if template not in _COMPILED:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        if len(_COMPILED) > 8:
            _COMPILED.clear()
        _COMPILED[template] = env.from_string(template)
    return _COMPILED[template]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    d = json.loads(path.read_text(encoding="utf-8"))
    return d if isinstance(d, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _find_template(folder: Path, config: dict) -> tuple[str | None, str]:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8"), jinja.name
    raw = folder / "chat_template.json"  # older processors' layout: {"chat_template": "..."}
    for value, source in ((config.get("chat_template"), "tokenizer_config.json"),
                          (_read_json(raw).get("chat_template"), raw.name)):
        if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if isinstance(value, str) and value.strip():
            return value, source
    return None, ""


def _added_tokens(tokenizer_json: Path) -> dict[str, int]:
    d = _read_json(Path(tokenizer_json))
    return {t["content"]: t["id"] for t in d.get("added_tokens") or () if isinstance(t, dict)
            and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)}
