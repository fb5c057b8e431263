"""`koifish chat`: an interactive loop over a ChatSession (streaming, commands, tokens/s), or one
reply for a prompt read from stdin when stdin is not a terminal."""

from __future__ import annotations

import sys

from rich.markup import escape


def run_chat(model, *, models_dir, bits, device, kv_bits=16, act_bits=None, think, max_new_tokens, temperature,
             seed, out, err) -> None:
    from koifish_core.infer.chat_open import open_chat

    err.print(f"loading {escape(str(model))} ...")
    session = open_chat(model, models_dir=models_dir, bits=bits, device=device, kv_bits=kv_bits, act_bits=act_bits,
                        think=think, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if not sys.stdin.isatty():  # scripts: the whole of stdin is one prompt, the reply goes to stdout
        prompt = sys.stdin.read().strip()
        if prompt:
            reply = session.ask(prompt)
            write(reply.answer + "\n")
        return
    err.print("[dim]/reset, /system TEXT, /think on|off, /exit; Ctrl-C stops a reply[/]")
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            err.print()
            return
        if not line.strip():
            continue
        if session.is_command(line):
            result = session.command(line)
            err.print(f"[dim]{escape(result.message)}[/]")
            if result.kind == "exit":
                return
            continue
        try:
            reply = session.ask(line, on_text=write)
        except KeyboardInterrupt:  # the session already ended the reply; the chat goes on
            err.print("\n[yellow]reply stopped[/]")
            continue
        err.print(f"\n[dim]{reply.tokens} tokens, {reply.tokens_per_s:.1f} tokens/s"
                  f"{' (stopped)' if reply.finish == 'interrupted' else ''}[/]")
