"""Text on the way out: incremental detokenization, stop strings, and the chat template.

Chat template (``/v1/chat/completions``): each message becomes one ``Role: content`` line
(``System:``, ``User:``, ``Assistant:``, ...), the lines are joined with newlines, and a final
``Assistant:`` line asks the model to answer::

    System: You are terse.
    User: Who is Romeo?
    Assistant:

Generation stops (besides max_tokens, the end-of-text token and the request's own stop strings)
when the model starts a new ``User:`` or ``System:`` line, so that it answers one turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .errors import BadRequest

CHAT_STOP = ("\nUser:", "\nSystem:")
_REPLACEMENT = "\ufffd"  # an incomplete UTF-8 sequence at the end of a byte-level decode


class TextTracker:
    """Decoded text of the generated ids; holds back what could still become a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        full = self._decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = full[:min(hits)]
            self.stopped = True
            return self.flush()
        self.text = full
        safe = len(full) - self._holdback(full)
        while safe > 0 and full[safe - 1] == _REPLACEMENT:
            safe -= 1
        if safe <= self.emitted:
            return ""
        delta = full[self.emitted:safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        """Everything not handed out yet (at the end of the generation)."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise BadRequest(f"messages[{index}].content: only text parts ({{\"type\": \"text\", "
                                 "\"text\": ...}}) are supported", "messages")
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts", "messages")


def chat_prompt(messages: Any) -> str:
    """OpenAI chat messages -> the plain-text prompt (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role and content", "messages")
        lines.append(f"{m['role'].strip().capitalize()}: {_content_text(m.get('content'), i)}")
    lines.append("Assistant:")
    return "\n".join(lines)
