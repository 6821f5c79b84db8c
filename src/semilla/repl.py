"""`semilla chat`: an interactive conversation in the terminal, streamed token by token."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import TextIO

from semilla.api import LanguageModel
from semilla.config import GenerateConfig, field_types, parse_value
from semilla.errors import SemillaError

HELP = """commands:
  /reset              forget the conversation (keeps the system prompt)
  /system TEXT        set the system prompt
  /set NAME VALUE     change a sampling setting, e.g. /set temperature 0.7
  /settings           show the sampling settings
  /save FILE          write the conversation as JSON (OpenAI messages)
  /help               this help
  /quit               leave (Ctrl-D too)
A line ending in a backslash continues on the next line. Ctrl-C stops a reply."""


class ChatSession:
    """Conversation state and commands, independent of where input comes from."""

    def __init__(self, lm: LanguageModel, cfg: GenerateConfig, system: str | None = None):
        self.lm, self.cfg, self.system = lm, cfg, system
        self.messages: list[dict[str, str]] = []

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def command(self, line: str) -> str:
        """Run a /command; returns the text to show."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name == "reset":
            self.messages.clear()
            return "(conversation cleared)"
        if name == "system":
            self.system = rest or None
            return f"(system prompt {'set' if rest else 'removed'})"
        if name == "set":
            key, _, value = rest.partition(" ")
            types = field_types(GenerateConfig)
            if key not in types or key in ("stop", "stop_token_ids"):
                return f"unknown setting {key!r}; try: {', '.join(k for k in types if k not in ('stop', 'stop_token_ids'))}"
            try:
                candidate = dataclasses.replace(self.cfg, **{key: parse_value(types[key], value)})
                self.cfg = candidate.validate()
            except (ValueError, SemillaError) as e:
                return f"error: {e}"
            return f"({key} = {getattr(self.cfg, key)})"
        if name == "settings":
            return "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(self.cfg).items())
        if name == "save":
            if not rest:
                return "usage: /save FILE"
            try:
                with open(rest, "w", encoding="utf-8") as f:
                    json.dump({"messages": self.conversation()}, f, ensure_ascii=False, indent=2)
            except OSError as e:
                return f"error: cannot write {rest}: {e.strerror}"
            return f"(saved {len(self.conversation())} messages to {rest})"
        if name == "help":
            return HELP
        return f"unknown command /{name}; /help lists them"

    def reply(self, user_text: str, out: TextIO) -> str:
        """Stream the assistant's answer to `out`; Ctrl-C ends it early. Returns the reply."""
        self.messages.append({"role": "user", "content": user_text})
        ids = self.lm.chat_ids(self.conversation())
        pieces: list[str] = []
        try:
            for piece in self.lm.stream_ids(ids, self.cfg):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        return text


def read_message(prompt: str = "> ") -> str | None:
    """One message from the terminal; trailing backslashes join lines. None at end of input."""
    lines = []
    while True:
        try:
            line = input(prompt if not lines else "... ")
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def run_chat(lm: LanguageModel, cfg: GenerateConfig, system: str | None = None) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 (line editing and history for input())
    session = ChatSession(lm, cfg, system)
    print(
        f"chatting with {lm.config.get('path')} — /help for commands, Ctrl-D to leave",
        file=sys.stderr,
    )
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            print()
            continue
        if text is None or text.strip() in ("/quit", "/exit"):
            return 0
        if not text.strip():
            continue
        if text.startswith("/"):
            print(session.command(text.strip()))
            continue
        session.reply(text, sys.stdout)
