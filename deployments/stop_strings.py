"""OpenAI's `stop` sequences over streamed text: the reply ends before the first occurrence, and text that might
be the start of a stop sequence is held back until the next piece decides it; and a reply's text as its tokens
arrive, detokenized and then through its stop sequences (the thinker deployment's and the batch job's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.tokenizer import OmniTokenizer


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text received but not released yet

    def push(self, text: str) -> tuple[str, bool]:
        """New text → (text safe to release, whether a stop sequence was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """At the end of the reply, the held-back text was not a stop sequence after all."""
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class ReplyText:
    """The reply's text as tokens arrive: streaming detokenization (no broken UTF-8) and OpenAI stop sequences."""

    def __init__(self, tokenizer: OmniTokenizer, stop_strings: list[str], stop_token_ids: tuple[int, ...]):
        self.detokenizer = tokenizer.stream(skip_special_tokens=True)
        self.stops = StopStrings(stop_strings)
        self.stop_token_ids = stop_token_ids

    def replay(self, tokens: list[int]) -> None:
        """Take in a resumed reply's first tokens, whose text was sent before: the detokenizer and the stop
        sequences then hold what they held after those tokens in the undisturbed reply (a character split across
        tokens, text that may start a stop sequence), so the text of the tokens after them is the same too."""
        for token in tokens:
            self.add(token, None)

    def add(self, token: int, reason: str | None) -> tuple[list[int], str, str | None, bool]:
        """One generated token and the thinker's finish reason → (the reply's new ids, its new text, the finish
        reason, whether a stop sequence ended it)."""
        # the stop token ends the reply but is not part of it (OmniModel.generate's token_ids agree)
        ids = [] if reason == "stop" and token in self.stop_token_ids else [token]
        piece = self.detokenizer.push(ids) + (self.detokenizer.flush() if reason is not None else "")
        text, hit = self.stops.push(piece)
        if hit:
            return ids, text, "stop", True
        if reason is not None:
            text += self.stops.flush()  # held-back text that turned out not to start a stop sequence
        return ids, text, reason, False
