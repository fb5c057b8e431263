"""The chat session engine behind `koifish chat` and the TUI's chat screen (no UI in here).

A session holds the conversation, renders it with the model's chat template, and decodes a
reply token by token with a KV cache. Between turns the cache keeps the longest prefix the new
prompt shares with what it already holds (the template rewrites the previous reply without its
thinking, so only the tail is computed again).

The model is anything with the decoder protocol of koifish_core.models.qwen3.Qwen3:
    new_cache(batch, max_len) -> cache with .length, .max_len and .truncate(n)
    forward(ids (1, T), cache=cache, last_only=True) -> (logits (1, 1, V), None)
or the GPU engine's (koifish_core.infer.qwen3_gpu.Qwen3GPU), which samples on the device:
    set_sampling(params, seed), prefill_sample(ids (1, T), cache, context) -> (1,) token,
    decode_sample(cache) -> (1,) token (feeds the token it drew last)

Commands: /reset, /system [TEXT], /think [on|off], /exit, /help.
Stopping a reply: press Ctrl-C during `ask` (KeyboardInterrupt is caught), or call stop() from
another thread; the partial reply stays in the history.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import numpy as np

from koifish_core.errors import KoifishError
from koifish_core.infer.sampling import Sampler, SamplingParams

HELP = ("/reset  forget the conversation   /system TEXT  set the system prompt (empty: none)\n"
        "/think on|off  let the model think first   /exit  leave")


@dataclass
class Reply:
    text: str
    """Everything the model wrote (with its <think> block when it thought)."""
    tokens: int
    """Tokens generated (the stop token not counted)."""
    seconds: float
    """Decode time, prefill included."""
    prompt_tokens: int
    """Prompt tokens computed this turn (those not already in the KV cache)."""
    finish: str
    """"stop" (end-of-turn token), "length" (max_new_tokens or a full context) or "interrupted"."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def thinking(self) -> str | None:
        if "</think>" not in self.text:
            return None
        return self.text.split("</think>")[0].split("<think>")[-1].strip("\n")

    @property
    def answer(self) -> str:
        return self.text.split("</think>")[-1].lstrip("\n")


@dataclass
class CommandResult:
    kind: str
    """"reset", "system", "think", "exit", "help" or "unknown"."""
    message: str


@dataclass
class ChatOptions:
    max_new_tokens: int = 1024
    think: bool = True
    """Qwen3's enable_thinking: reason in a <think> block before answering."""
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_context: int | None = None
    """Positions in the KV cache; None = the model's n_ctx."""


class ChatSession:
    def __init__(self, model, tokenizer, template, stop_ids: set[int], options: ChatOptions | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.options = options or ChatOptions()
        if self.options.max_new_tokens <= 0:
            raise KoifishError(f"--max-new-tokens: expected a positive number, got {self.options.max_new_tokens}")
        self.stop_ids = set(stop_ids)
        self.sampler = Sampler(self.options.sampling)
        self.messages: list[dict] = []
        self.last_reply: Reply | None = None
        self._stop = threading.Event()
        self._cache = None
        self._cached: list[int] = []  # ids whose keys/values the cache holds, in order
        # A model with prefill_sample/decode_sample (koifish_core.infer.qwen3_gpu) draws tokens itself
        self._on_device = hasattr(model, "decode_sample")

    # ---- commands ----

    @staticmethod
    def is_command(line: str) -> bool:
        return line.startswith("/")

    def command(self, line: str) -> CommandResult:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name == "/reset":
            self.messages.clear()
            return CommandResult("reset", "conversation cleared")
        if name == "/system":
            self.options.system = arg or None
            return CommandResult("system", f"system prompt set: {arg}" if arg else "system prompt removed")
        if name == "/think":
            if arg in ("on", "off"):
                self.options.think = arg == "on"
            elif arg:
                return CommandResult("unknown", f"/think: expected on or off, got {arg!r}")
            return CommandResult("think", f"thinking {'on' if self.options.think else 'off'}")
        if name in ("/exit", "/quit"):
            return CommandResult("exit", "bye")
        if name == "/help":
            return CommandResult("help", HELP)
        return CommandResult("unknown", f"unknown command {name}; commands:\n{HELP}")

    def stop(self) -> None:
        """Ask the reply being generated to end after the current token (thread-safe)."""
        self._stop.set()

    # ---- replies ----

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.options.system}] if self.options.system else []
        return system + self.messages

    def prompt_ids(self) -> list[int]:
        text = self.template.render(self.conversation(), add_generation_prompt=True,
                                    enable_thinking=self.options.think)
        return self.tokenizer.encode(text)

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Logits after the prompt, reusing the cached prefix; returns (logits (V,), tokens computed)."""
        if self._cache is None:
            self._cache = self.model.new_cache(batch=1, max_len=self.options.max_context or self.model.config.n_ctx)
            if self._on_device:
                self.model.set_sampling(self.options.sampling, self.options.sampling.seed)
        limit = self._cache.max_len
        if len(ids) >= limit:
            raise KoifishError(f"the conversation is {len(ids)} tokens and the context holds {limit}; "
                               "/reset to start over")
        self._cached = self._cached[:self._cache.length]  # an interrupted forward may not have landed
        same = 0
        for a, b in zip(self._cached, ids[:-1]):  # the last prompt token is always computed: its logits start the reply
            if a != b:
                break
            same += 1
        self._cache.truncate(same)
        self._cached = self._cached[:same]
        if self._on_device:  # the GPU engine samples on the device: the first token, not logits
            token = self.model.prefill_sample(np.array([ids[same:]]), self._cache, context=[ids])
            self._cached = list(ids)
            return int(token[0]), len(ids) - same
        logits, _ = self.model.forward(np.array([ids[same:]]), cache=self._cache, last_only=True)
        self._cached = list(ids)
        return logits[0, -1], len(ids) - same

    def stream(self, user_text: str) -> Iterator[str]:
        """Adds the user's turn and yields the reply's text as it decodes; then see last_reply."""
        self._stop.clear()
        self.messages.append({"role": "user", "content": user_text})
        start = time.perf_counter()
        ids = self.prompt_ids()
        try:
            pending, computed = self._prefill(ids)  # logits (V,), or the drawn token on the device
        except BaseException:
            self.messages.pop()  # no reply came: the turn never happened
            raise
        out: list[int] = []
        text_parts: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish = "length"
        try:
            for _ in range(self.options.max_new_tokens):
                token = pending if self._on_device else self.sampler(pending, ids + out)
                if token in self.stop_ids:
                    finish = "stop"
                    break
                out.append(token)
                piece = decoder.decode(self._token_bytes(token))
                if piece:
                    text_parts.append(piece)
                    yield piece
                if self._stop.is_set():
                    finish = "interrupted"
                    break
                if self._cache.length + 1 > self._cache.max_len:
                    break
                if self._on_device:
                    pending = int(self.model.decode_sample(self._cache)[0])
                else:
                    logits, _ = self.model.forward(np.array([[token]]), cache=self._cache, last_only=True)
                    pending = logits[0, -1]
                self._cached.append(token)
            tail = decoder.decode(b"", final=True)  # a reply cut inside a UTF-8 sequence ends in U+FFFD
            if tail:
                text_parts.append(tail)
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            finish = "interrupted"
            raise
        finally:
            text = "".join(text_parts)
            self.messages.append({"role": "assistant", "content": text})
            self.last_reply = Reply(text, len(out), time.perf_counter() - start, computed, finish)

    def _token_bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_single_token_bytes(token)
        except KeyError:  # an embedding row past the tokenizer (Qwen3 pads 151,669 ids to 151,936)
            return b""

    def ask(self, user_text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """One turn: stream the reply into on_text; Ctrl-C ends the reply, not the chat."""
        self.last_reply = None
        pieces = self.stream(user_text)
        try:
            for piece in pieces:
                if on_text is not None:
                    on_text(piece)
        except KeyboardInterrupt:
            pieces.close()
        if self.last_reply is None:  # interrupted while reading the prompt: the turn was withdrawn
            self.last_reply = Reply("", 0, 0.0, 0, "interrupted")
        return self.last_reply
