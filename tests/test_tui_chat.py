"""The chat screen: streaming pieces, thinking folded, tokens/s, commands, stop; and the real engine."""

import asyncio
import threading

import pytest
from textual.widgets import Collapsible

from koifish_app.tui.app import make_app
from koifish_app.tui.chat import ChatScreen
from koifish_app.tui.model_folders import ModelFolder
from koifish_app.tui.widgets.chat_message import ChatMessage, split_thinking
from tests.test_tui_screens import flat, screen_text, wait_until
from tests.tui_fixtures import FakeChatSession, FakeStats

SIZE = (80, 24)
PIECES = ["<think>", "\nthe user", " greets", "\n</think>", "\n\n", "Hel", "lo", " the", "re", "!"]


def test_split_thinking():
    assert split_thinking("plain answer") == (None, "plain answer", False)
    assert split_thinking("<think>\nhalf way") == ("half way", "", True)
    assert split_thinking("<think>\nwhy\n</think>\n\nbecause") == ("why", "because", False)
    assert split_thinking("<think>\n\n</think>\n\nno thought") == ("", "no thought", False)


def _app(tmp_path, session, opened=None):
    def opener(folder):
        if opened is not None:
            opened.append(folder)
        return session

    return make_app(runs_dir=tmp_path / "runs", system_stats=FakeStats(), hub_roots=[], chat_opener=opener)


def test_chat_streams_pieces_with_thinking_folded(tmp_path):
    session = FakeChatSession(PIECES, delay=0.01)
    opened = []

    async def body():
        app = _app(tmp_path, session, opened)
        async with app.run_test(size=SIZE) as pilot:
            app.open_chat(ModelFolder("tiny-qwen", tmp_path / "tiny-qwen", "qwen3", "models-dir"))
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            box = screen.query_one("#chat-input")
            assert await wait_until(pilot, lambda: screen.session is not None and not box.disabled)
            assert opened == [tmp_path / "tiny-qwen"]
            await pilot.press(*"hi", "enter")
            assert await wait_until(pilot, lambda: not screen.generating)
            assert session.asked == ["hi"]
            reply = list(screen.query(ChatMessage))[-1]
            assert reply.text == "".join(PIECES) and reply.answer == "Hello there!"
            folded = reply.query_one(Collapsible)
            assert folded.collapsed and folded.display and "thought (3 words)" in folded.title
            text = screen_text(app)
            assert "Hello there!" in text and "the user greets" not in text  # thinking stays folded
            assert f"{len(PIECES)} tokens" in text and "tok/s" in text and "stop" in text
            await pilot.press(*"/think off", "enter")
            assert session.options.think is False and "thinking off" in flat(screen_text(app))
            await pilot.press("ctrl+t")
            assert session.options.think is True and "thinking on" in flat(screen_text(app))
            await pilot.press("f1")
            assert "chat.think" in screen_text(app)

    asyncio.run(body())


def test_escape_stops_a_reply_then_goes_back(tmp_path):
    gate = threading.Event()
    session = FakeChatSession(PIECES, delay=0.0, block=gate)

    async def body():
        app = _app(tmp_path, session)
        async with app.run_test(size=SIZE) as pilot:
            app.open_chat(tmp_path / "m")
            await pilot.pause()
            screen = app.screen
            assert await wait_until(pilot, lambda: screen.session is not None)
            await pilot.press("x", "enter")
            assert await wait_until(pilot, lambda: screen.reply is not None and screen.reply.text == "<think>")
            await pilot.press("escape")  # stops the reply, stays on the screen
            gate.set()
            assert await wait_until(pilot, lambda: not screen.generating)
            assert app.screen is screen and session.last_reply.finish == "interrupted"
            assert "interrupted" in screen_text(app)
            await pilot.press("escape")
            assert app.screen is not screen

    asyncio.run(body())


def test_chat_open_failure_is_a_message(tmp_path):
    from koifish_core.errors import ModelError

    def opener(folder):
        raise ModelError(f"{folder}: no tokenizer.json; chat needs the model's tokenizer files")

    async def body():
        app = make_app(runs_dir=tmp_path, system_stats=FakeStats(), hub_roots=[], chat_opener=opener)
        async with app.run_test(size=SIZE) as pilot:
            app.open_chat(tmp_path / "broken")
            await pilot.pause()
            assert await wait_until(pilot, lambda: "no tokenizer.json" in flat(screen_text(app)))
            assert app.screen.query_one("#chat-input").disabled

    asyncio.run(body())


def test_picker_lists_model_folders(tmp_path):
    (tmp_path / "models" / "tiny-qwen").mkdir(parents=True)
    (tmp_path / "models" / "tiny-qwen" / "config.json").write_text('{"model_type": "qwen3"}')
    opened = []

    async def body():
        app = make_app(runs_dir=tmp_path / "runs", models_dir=tmp_path / "models", system_stats=FakeStats(),
                       hub_roots=[], chat_opener=lambda f: opened.append(f) or FakeChatSession(["ok"]))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert "tiny-qwen" in screen_text(app)  # listed on the home screen
            await pilot.press("m")  # chat with the selected model
            assert isinstance(app.screen, ChatScreen)
            assert await wait_until(pilot, lambda: opened == [tmp_path / "models" / "tiny-qwen"])
            await pilot.press("escape")
            app.open_chat(None)  # no model chosen: the picker
            await pilot.pause()
            assert "tiny-qwen" in screen_text(app) and "pick a model" in screen_text(app)
            await pilot.press("enter")
            assert await wait_until(pilot, lambda: len(opened) == 2)

    asyncio.run(body())


def test_real_engine_reply_equals_chat_session(tmp_path):
    pytest.importorskip("transformers")
    from koifish_core.infer.chat_open import open_chat
    from tests.qwen3_fixtures import tiny_chat_folder

    folder, _, _ = tiny_chat_folder(tmp_path / "tiny-qwen")
    expected = open_chat(folder, temperature=0.0, max_new_tokens=12).ask("Hello there!")

    async def body():
        app = make_app(runs_dir=tmp_path, system_stats=FakeStats(), hub_roots=[],
                       chat_opener=lambda f: open_chat(f, temperature=0.0, max_new_tokens=12))
        async with app.run_test(size=SIZE) as pilot:
            app.open_chat(folder)
            await pilot.pause()
            screen = app.screen
            assert await wait_until(pilot, lambda: screen.session is not None, timeout=30)
            await pilot.press(*"Hello there!", "enter")
            assert await wait_until(pilot, lambda: not screen.generating, timeout=30)
            reply = list(screen.query(ChatMessage))[-1]
            assert reply.text == expected.text and screen.session.last_reply.tokens == expected.tokens

    asyncio.run(body())
