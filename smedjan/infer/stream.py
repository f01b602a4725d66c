"""Token ids to text as they arrive: incomplete UTF-8 and possible stop-string prefixes held back."""

from __future__ import annotations


def decode_text(tokenizer, ids) -> str:
    """User-facing text: special tokens skipped."""
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a tokenizer without the keyword
        return tokenizer.decode(ids)


class TextStream:
    """Token ids in, text deltas out: holds back incomplete UTF-8 and possible stop-string prefixes."""

    def __init__(self, tokenizer, stops=(), prompt_tail: list[int] | None = None):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids = list(prompt_tail or [])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all generated text so far
        self.emitted = 0
        self.stopped = False

    def _decode_delta(self) -> str:
        prefix = decode_text(self.tok, self.ids[self.prefix_offset : self.read_offset])
        full = decode_text(self.tok, self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text now safe to emit. Sets `stopped` on a stop string."""
        self.ids.append(int(token_id))
        self.text += self._decode_delta()
        if self.stops:
            start = max(0, self.emitted - max(len(s) for s in self.stops))
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                self.stopped = True
                return self._emit(end)
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            return self._emit(len(self.text) - hold)
        return self._emit(len(self.text))

    def flush(self) -> str:
        """At the end: whatever was held back (a partial stop string, or dangling bytes)."""
        if not self.stopped:
            full = decode_text(self.tok, self.ids[self.prefix_offset :])
            prefix = decode_text(self.tok, self.ids[self.prefix_offset : self.read_offset])
            if len(full) > len(prefix):
                self.text += full[len(prefix) :]
                self.prefix_offset = self.read_offset = len(self.ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
