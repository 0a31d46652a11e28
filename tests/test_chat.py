"""The chat API (Conversation over ChatClient) against the real shared vLLM server and demo_expert, whose
model has a 2048-token window: history trimmed to fit, a prompt that cannot fit refused, an interrupt that
keeps the partial answer and stops a loop of questions, seeds, a pluggable search, and one-paragraph errors."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from sage_magic.chat.client import ChatClient
from sage_magic.chat.conversation import Conversation
from sage_magic.core.errors import SageError
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT, DEMO_PROMPT_2

pytestmark = pytest.mark.vllm

SENTENCE = "The adapter is loaded on its shared base server and answers questions about SAGE. "


@pytest.fixture
def chat(expert, settings) -> Conversation:
    return Conversation(ChatClient(expert), settings)


def test_a_long_history_loses_its_oldest_turns_to_fit_the_window(chat: Conversation) -> None:
    window = chat.client.max_model_len()
    assert window == 2048
    for n in range(40):
        chat.history += [{"role": "user", "content": f"Question {n}: {SENTENCE * 3}"},
                         {"role": "assistant", "content": f"Answer {n}: {SENTENCE * 3}"}]
    before = list(chat.history)
    assert chat.client.count_tokens(chat.messages_for(DEMO_PROMPT)) > window  # would be a 400 unless trimmed

    answer = chat.ask(DEMO_PROMPT, max_tokens=64)

    dropped = answer.trimmed_turns
    assert 0 < dropped < 40 and answer.text
    assert answer.stream.prompt_tokens + 64 <= window
    assert chat.history[:-2] == before[2 * dropped:]  # the oldest whole turns went, the rest stayed in order
    assert chat.history[-2]["content"] == DEMO_PROMPT
    # and no more were dropped than needed: keeping one more turn would not have fitted
    one_more = chat.messages_for(DEMO_PROMPT, history=before[2 * (dropped - 1):])
    assert chat.client.count_tokens(one_more) + 64 > window


def test_a_short_chat_is_not_measured_before_asking_and_a_long_one_is(chat: Conversation) -> None:
    """The /tokenize probe is a round trip before the first token; a chat far below the window skips it (the
    answer is unchanged), and one near the window is measured, so the trimming above still happens."""
    probes = []
    count = chat.client.count_tokens
    chat.client.count_tokens = lambda messages: probes.append(messages) or count(messages)  # type: ignore
    assert chat.ask(DEMO_PROMPT).text == DEMO_ANSWERS["demo_expert"] and probes == []
    for n in range(4):  # ~2,100 bytes: too close to the window to skip, and ~1,700 tokens, so it fits
        chat.history += [{"role": "user", "content": f"Question {n}: {SENTENCE * 3}"},
                         {"role": "assistant", "content": f"Answer {n}: {SENTENCE * 3}"}]
    chat.ask(DEMO_PROMPT, max_tokens=64)
    assert probes and count(probes[0]) + 64 <= 2048  # measured, and it fitted: nothing trimmed
    assert len(chat.history) == 2 + 8 + 2


def test_a_question_that_cannot_fit_even_alone_is_refused_not_cut(chat: Conversation) -> None:
    chat.history += [{"role": "user", "content": DEMO_PROMPT}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(SageError) as error:
        chat.ask("tensor " * 3000, max_tokens=64)
    message = str(error.value)
    assert "2048-token window" in message and "even with no history" in message and "\n" not in message
    assert len(chat.history) == 2  # nothing was asked, nothing forgotten


def test_an_interrupt_keeps_the_partial_answer_and_stops_the_loop(chat: Conversation) -> None:
    """Ctrl-C in a terminal or a kernel interrupt in a notebook is a SIGINT to the main thread; it used to be
    swallowed, so `for q in questions: chat.ask(q)` went on with the next question. The SIGINT is raised when
    the first piece of the answer arrives, so it lands mid-stream whatever the load; how much text that piece
    holds is vLLM's choice (a slow reader gets several tokens at once), so only its being a prefix is checked."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "an earlier test left SIGINT handled"
    asked = []
    with pytest.raises(KeyboardInterrupt):
        for question in (DEMO_PROMPT, DEMO_PROMPT_2):
            asked.append(question)
            chat.ask(question, on_delta=lambda delta: signal.raise_signal(signal.SIGINT))
    assert asked == [DEMO_PROMPT]
    question, partial = chat.history
    assert question == {"role": "user", "content": DEMO_PROMPT}
    assert partial["stopped"] and partial["content"] and DEMO_ANSWERS["demo_expert"].startswith(partial["content"])
    # the model sees the partial answer as it was, without the marker; and the server still answers
    assert {"role": "assistant", "content": partial["content"]} in chat.messages_for(DEMO_PROMPT_2)
    assert chat.ask(DEMO_PROMPT_2).text


def test_a_seed_makes_a_sampled_answer_repeatable(expert, settings) -> None:
    def sample(seed: int) -> str:
        return Conversation(ChatClient(expert), settings).ask(
            "Tell me a long story about tensors.", temperature=1.5, seed=seed, max_tokens=32).text

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again and first != other


def test_a_given_search_function_grounds_the_answer(expert, settings) -> None:
    """The notebook searches in a helper process; the conversation must use the search it is given (the
    index below does not exist here, so the in-process search would fail)."""
    from sage_magic.rag import Hit

    calls = []

    def search(index: str, query: str, top_k: int, mode: str) -> list[Hit]:
        calls.append((index, query, top_k, mode))
        return [Hit("notes/tensors.md", "Tensors", 0.9, "Tensors are stored in float32 here.", "c1")]

    chat = Conversation(ChatClient(expert), settings, search=search)
    answer = chat.ask("How are tensors stored?", index="remote-notes", top_k=3, mode="dense")
    assert calls == [("remote-notes", "How are tensors stored?", 3, "dense")]
    assert [c.source for c in answer.citations] == ["notes/tensors.md"]
    assert "float32" in answer.context and answer.text


def test_a_refused_key_and_an_unknown_model_are_one_paragraph_each(expert, settings) -> None:
    cases = {replace(expert, api_key="not-the-key"): "refused the API key",
             expert.for_model("no_such_model"): "does not serve a model named 'no_such_model'"}
    for endpoint, expected in cases.items():
        with pytest.raises(SageError) as error:
            Conversation(ChatClient(endpoint), settings).ask(DEMO_PROMPT)
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_our_server_is_reached_directly_whatever_proxy_the_environment_names(
        expert, settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead proxy in the environment: requests to our own server (loopback or socket) must not go there."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    chat = Conversation(ChatClient(expert), settings)
    assert chat.client.count_tokens(chat.messages_for(DEMO_PROMPT)) > 0
    assert chat.ask(DEMO_PROMPT).text == DEMO_ANSWERS["demo_expert"]
