"""The terminal REPL: prompt_toolkit input with history, streamed replies, slash commands.

With stdin not a terminal it reads one message per line, prints each reply, and exits at end of input.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from dialogue.errors import RapportError, StoreUnavailable
from dialogue.manager import Reply
from bot.services import Services
from dialogue.store import new_id
from memory.text import CONTROL_CHARS

HELP = """\
Commands:
  /help                     this list
  /new                      start a new conversation (memories and persona stay)
  /rate up|down [comment]   rate the last reply (it teaches the next adapter version)
  /persona [set key=value]  show or change what I know about how to talk to you
  /memory                   list what I remember about you
  /forget [ID|all]          forget one memory, or all of them
  /sources                  where the last reply came from
  /quit                     leave (Ctrl-D works too)
Ctrl-C stops a reply without leaving."""


def printable(text: str) -> str:
    """Text with terminal control sequences defused (their ESC and other control bytes removed)."""
    return CONTROL_CHARS.sub("", text)


@dataclass
class ChatSession:
    """One user's REPL state; channel-independent so piped and interactive modes share it."""

    services: Services
    user_id: str
    conversation_id: str = field(default_factory=new_id)
    last_reply: Reply | None = None

    async def command(self, line: str) -> str | None:
        """Run a slash command; returns the text to show, or None to quit."""
        name, _, args = line[1:].partition(" ")
        handler = self.commands().get(name.lower())
        if handler is None:
            return f"Unknown command /{name}. Type /help for the list."
        return await handler(args.strip())

    def commands(self) -> dict[str, Callable]:
        return {
            "help": self.cmd_help, "new": self.cmd_new, "rate": self.cmd_rate, "quit": self.cmd_quit,
            "exit": self.cmd_quit, "sources": self.cmd_sources, "persona": self.cmd_persona,
            "memory": self.cmd_memory, "forget": self.cmd_forget,
        }

    async def cmd_help(self, _args: str) -> str:
        return HELP

    async def cmd_quit(self, _args: str) -> None:
        return None

    async def cmd_new(self, _args: str) -> str:
        self.conversation_id, self.last_reply = new_id(), None
        return "Started a new conversation."

    async def cmd_rate(self, args: str) -> str:
        verdict, _, comment = args.partition(" ")
        rating = {"up": 1, "+1": 1, "good": 1, "down": -1, "-1": -1, "bad": -1}.get(verdict.lower())
        if rating is None:
            return "Usage: /rate up|down [comment]"
        if self.last_reply is None or not self.last_reply.recorded:
            return "There is no reply to rate yet."
        await self.services.manager.rate(turn_id=self.last_reply.turn_id, rating=rating, user_id=self.user_id,
                                         comment=comment.strip() or None)
        return "Thanks, noted." if rating > 0 else "Thanks, noted. I'll try to do better."

    async def cmd_sources(self, _args: str) -> str:
        if self.last_reply is None:
            return "There is no reply yet."
        if not self.last_reply.sources:
            return "The last reply used no FAQ entry or memory."
        return "\n".join(f"{s.kind}:{s.id}  score {s.score:.2f}" for s in self.last_reply.sources)

    async def cmd_persona(self, args: str) -> str:
        personas = self.services.personas
        if args:
            verb, _, assignment = args.partition(" ")
            key, eq, value = assignment.partition("=")
            if verb.lower() != "set" or not eq or not key.strip():
                return "Usage: /persona  or  /persona set key=value  (an empty value clears the field)"
            await asyncio.to_thread(personas.update, self.user_id, {key.strip(): value.strip()})
        persona = await asyncio.to_thread(personas.get, self.user_id)
        lines = [f"  {key:<11} {', '.join(value) if isinstance(value, list) else value}"
                 for key, value in persona.to_json().items() if value]
        if not lines:
            return "I know nothing about you yet. Tell me, or use /persona set name=…"
        return "What I know about how to talk to you:\n" + "\n".join(lines)

    async def cmd_memory(self, _args: str) -> str:
        memories = await asyncio.to_thread(self.services.memory.for_user(self.user_id).list)
        if not memories:
            return "I remember nothing about you yet."
        lines = [f"  {m.id}  {m.text}" for m in memories]
        return f"What I remember ({len(memories)}; /forget ID or /forget all):\n" + "\n".join(lines)

    async def cmd_forget(self, args: str) -> str:
        memory = self.services.memory.for_user(self.user_id)
        if not args:
            return "Usage: /forget ID  or  /forget all"
        if args.lower() == "all":
            count = await asyncio.to_thread(memory.forget_all)
            return f"Forgot everything ({count} memories)."
        await asyncio.to_thread(memory.forget, args)
        return f"Forgot {args}."

    async def reply(self, text: str, write: Callable[[str], None], notice: Callable[[str], None]) -> Reply:
        reply = await self.services.manager.respond(user_id=self.user_id, conversation_id=self.conversation_id,
                                                    text=text, channel="repl")
        self.last_reply = reply
        for line in reply.notices:
            notice(line)
        async for chunk in reply:
            write(printable(chunk))
        return reply


def run_piped(session: ChatSession, stdin=None, stdout=None) -> int:
    """One message per input line; each reply printed on its own; exit 0 at end of input."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def notice(text: str) -> None:
        print(f"[{text}]", file=sys.stderr)

    with asyncio.Runner() as runner:
        runner.run(session.services.backend.ready())  # a model that cannot load is fatal, not per line
        for raw in stdin:
            line = printable(raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw).strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    out = runner.run(session.command(line))
                    if out is None:
                        break
                    write(out + "\n")
                else:
                    runner.run(session.reply(line, write, notice))
                    write("\n")
            except RapportError as exc:
                print(f"error: {exc}", file=sys.stderr)
    return 0


def run_interactive(session: ChatSession, history_file: Path) -> int:
    """The terminal REPL; the model keeps loading in the background while the prompt is already up."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    console = Console(highlight=False)
    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(history_file)))
    console.print(f"[bold]Rapport[/bold] — talking with [cyan]{escape(session.user_id)}[/cyan]. "
                  "Type /help for commands; Ctrl-C stops a reply, Ctrl-D leaves.")

    def write(text: str) -> None:
        console.out(text, end="", highlight=False)

    def notice(text: str) -> None:
        console.print(f"[yellow]{escape(text)}[/yellow]")

    with asyncio.Runner() as runner:
        while True:
            try:
                line = runner.run(prompt.prompt_async("you › "))
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            line = printable(line).strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    out = runner.run(session.command(line))
                    if out is None:
                        break
                    console.print(escape(out))
                    continue
                if not session.services.backend.is_ready():
                    with console.status("Loading the model…"):
                        runner.run(session.services.backend.ready())  # a load failure ends the REPL
                console.print("[bold magenta]rapport ›[/bold magenta] ", end="")
                runner.run(session.reply(line, write, notice))
                console.print()
            except KeyboardInterrupt:
                console.print(" [dim](stopped)[/dim]")
            except RapportError as exc:
                if isinstance(exc, StoreUnavailable):  # the model or a store is gone: nothing more can work
                    raise
                console.print(f"[red]error:[/red] {escape(str(exc))}")
    console.print("Bye.")
    return 0
