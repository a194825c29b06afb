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
MAX_PENDING = 8  # tokens that may wait for a complete character before their text counts as final


class IncrementalDecoder:
    """The text of a growing id sequence, decoding a window of a few ids per token (O(1) amortised).

    The standard prefix/read offset scheme: ``context`` holds the ids of the last chunk whose text is
    already out (``context_text``); the text of the new ids ``ids[read:]`` is ``decode(context + new)``
    minus ``context_text``, so the decoder still sees what came before (WordPiece ``##`` pieces, leading
    spaces). A chunk whose ids decode to nothing on their own (skipped special tokens) does not replace
    the context, so the window stays a few ids long however many of them come in a row.

    While the text ends in U+FFFD (a UTF-8 sequence split across byte-level tokens) the new ids wait.
    After ``MAX_PENDING`` of them the text up to a boundary ``j`` at least 3 ids back is released when
    decoding the two sides apart gives the same text as decoding them together: with 3 or more bytes
    after it, no character can still straddle ``j`` (a UTF-8 sequence has at most 3 continuation bytes).
    Only when no boundary passes (not a byte-level decoder) does the U+FFFD count as final; the output
    then differs from ``decode(all ids)`` only if that U+FFFD would later have become a character.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._read = 0  # ids[read:] have not been turned into final text yet
        self._context: list[int] = []
        self._context_text = ""

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that became final (maybe empty)."""
        self.ids.append(token_id)
        window = self._decode(self._context + self.ids[self._read:])
        if not window.endswith(_REPLACEMENT):
            return self._advance(window)
        if len(self.ids) - self._read < MAX_PENDING:
            return ""
        return self._release_before_incomplete(window)

    def flush(self) -> str:
        """The text of the ids still waiting (at the end of the generation)."""
        if self._read == len(self.ids):
            return ""
        return self._advance(self._decode(self._context + self.ids[self._read:]))

    def _advance(self, window: str) -> str:
        delta = window[len(self._context_text):]
        new = self.ids[self._read:]
        own = self._decode(new)
        if own:  # the new ids become the context of the next ones; if they decode to nothing, the old
            self._context, self._context_text = new, own  # context still gives the next id its left side
        self._read = len(self.ids)
        return delta

    def _release_before_incomplete(self, window: str) -> str:
        """``MAX_PENDING`` ids wait on U+FFFD: release the text up to a boundary no character straddles."""
        ids, n = self.ids, len(self.ids)
        for j in range(n - 3, self._read, -1):
            left = self._decode(self._context + ids[self._read:j])
            if left + self._decode(ids[j:n]) == window:
                delta = left[len(self._context_text):]
                self._read, self._context, self._context_text = j, [], ""  # ids[j:] decode alone as in context
                return delta
        return self._advance(window)


class TextTracker:
    """Decoded text of the generated ids; holds back what could still become a stop string.

    Work per token is bounded: the ids go through an :class:`IncrementalDecoder`, and stop strings are
    searched in the new text plus the few characters before it that a stop string could start in.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(decode)
        self.stop = tuple(s for s in stop if s)
        self._reach = max((len(s) for s in self.stop), default=1) - 1  # chars a stop may start before new text
        self._parts: list[str] = []  # the text so far, in pieces (joined on demand)
        self._tail = ""  # the last ``_reach`` characters of the text
        self._unemitted = ""  # the end of the text not handed out yet
        self.emitted = 0  # characters of the text already handed out
        self.stopped = False

    @property
    def ids(self) -> list[int]:
        return self._decoder.ids

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token_id: int) -> str:
        """Add a token; returns the new text that is safe to show (maybe empty)."""
        return self._add(self._decoder.push(token_id), final=False)

    def flush(self) -> str:
        """Everything not handed out yet (at the end of the generation)."""
        if self.stopped:
            out, self._unemitted = self._unemitted, ""
            self.emitted += len(out)
            return out
        return self._add(self._decoder.flush(), final=True)

    def _add(self, delta: str, final: bool) -> str:
        if delta and not self.stopped:
            region = self._tail + delta
            hits = [i for i in (region.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                cut = min(hits) - len(self._tail)  # where the text ends, relative to the start of delta
                if cut < 0:
                    self._truncate(-cut)
                    delta = ""
                else:
                    delta = delta[:cut]
            self._parts.append(delta)
            self._tail = (self._tail + delta)[-self._reach:] if self._reach else ""
            self._unemitted += delta
        if self.stopped or final:
            out, self._unemitted = self._unemitted, ""
        else:
            safe = len(self._unemitted) - self._holdback(self._unemitted)
            out, self._unemitted = self._unemitted[:safe], self._unemitted[safe:]
        self.emitted += len(out)
        return out

    def _truncate(self, n: int) -> None:
        """Drop the last ``n`` characters of the text (a stop string that began before the new text)."""
        text = self.text[:-n]
        self._parts, self._tail = [text], text[-self._reach:] if self._reach else ""
        self._unemitted = self._unemitted[:max(0, len(self._unemitted) - n)]
        self.emitted = min(self.emitted, len(text))

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> ``[{"role", "content"}]`` with text content (text parts joined); 400 otherwise."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise BadRequest(f"messages[{i}] must be an object with a string role and content", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts "
                     "({\"type\": \"text\", \"text\": ...})", "messages")


def chat_prompt(messages: Any) -> str:
    """OpenAI chat messages -> the plain-text prompt (see the module docstring)."""
    lines = [f"{m['role'].strip().capitalize()}: {m['content']}" for m in normalize_messages(messages)]
    lines.append("Assistant:")
    return "\n".join(lines)
