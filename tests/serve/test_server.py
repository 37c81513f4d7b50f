"""`serve` as a user's client sees it: the official openai package against the server running on a loopback port,
on a run of two tiny personas exported to ONNX."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from exporter.runtime.runner import Runner, Sampling
from exporter.serve.scheduler import Served
from exporter.serve.server import Limits, served_models
from tests.serve.running import fetch, running, slow_steps

HELLO = [{"role": "user", "content": "plan a trip with friends"}]


@pytest.fixture(scope="module")
def models(run: Path) -> dict[str, Served]:
    return served_models(run, None)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def solo(run: Path, persona: str, sampling: Sampling, n: int, chat: list[dict[str, str]] = HELLO) -> tuple[str, bool]:
    """The reply `generate` gives: (text, cut at n tokens)."""
    runner = Runner(run / persona, "onnx")
    text = "".join(runner.stream(chat, n, sampling))
    return text, runner.truncated


def health(url: str) -> dict[str, Any]:
    status, body = fetch(url.removesuffix("/v1") + "/health")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def test_models_health_and_replies_streamed_or_not_are_the_runners(run: Path, models: dict[str, Served]) -> None:
    with running(models) as url:
        api = client(url)
        assert sorted(m.id for m in api.models.list().data) == ["extravert", "introvert"]
        assert api.models.retrieve("introvert").id == "introvert"
        assert health(url)["models"] == {"introvert": "onnx (onnxruntime)", "extravert": "onnx (onnxruntime)"}
        replies = {}
        for persona in ("introvert", "extravert"):
            want, cut = solo(run, persona, Sampling(temperature=1.0, seed=7), 12)
            out = api.chat.completions.create(model=persona, messages=HELLO, temperature=1.0, seed=7, max_tokens=12)
            choice = out.choices[0]
            assert choice.message.content == want and choice.finish_reason == ("length" if cut else "stop")
            assert out.usage is not None and out.usage.completion_tokens == 12 if cut else True
            stream = api.chat.completions.create(
                model=persona, messages=HELLO, temperature=1.0, seed=7, max_tokens=12, stream=True
            )
            chunks = list(stream)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
            assert chunks[-1].choices[0].finish_reason == choice.finish_reason
            replies[persona] = want
        assert replies["introvert"] != replies["extravert"] and len(replies["introvert"]) > 5


def test_sampling_is_seeded_greedy_at_temperature_0_and_stops_at_a_stop_sequence(
    run: Path, models: dict[str, Served]
) -> None:
    with running(models) as url:
        api = client(url)

        def ask(**kw: Any) -> Any:
            return api.chat.completions.create(model="extravert", messages=HELLO, max_tokens=16, **kw).choices[0]

        seeded = [ask(temperature=1.0, seed=s).message.content for s in (1, 1, 2)]
        assert seeded[0] == seeded[1] != seeded[2]
        greedy = ask(temperature=0, seed=5)
        assert greedy.message.content == ask(temperature=0, seed=6).message.content
        assert greedy.message.content == solo(run, "extravert", Sampling(), 16)[0]
        text = seeded[0]
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = ask(temperature=1.0, seed=1, stop=["never there", stop])
        assert cut.message.content == text[: text.find(stop)] and cut.finish_reason == "stop"


def test_generation_defaults_come_from_the_export(
    run: Path, models: dict[str, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request without temperature / top_p samples as the export's generation_config.json says."""
    defaults = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0, "max_tokens": 10}
    monkeypatch.setattr(models["introvert"], "defaults", defaults)
    with running(models) as url:
        out = client(url).chat.completions.create(model="introvert", messages=HELLO, seed=3)
    assert out.choices[0].message.content == solo(run, "introvert", Sampling(0.7, 0.9, seed=3), 10)[0]
    assert out.usage is not None and out.usage.completion_tokens <= 10


def test_concurrent_clients_are_decoded_together_and_each_gets_its_own_reply(
    run: Path, models: dict[str, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    for m in models.values():
        monkeypatch.setattr(m.decoder, "step", slow_steps(m, 0.01))
    asks = [("introvert" if i % 2 else "extravert", i) for i in range(6)]
    got: dict[int, str] = {}
    # room for every request (4 rows decoded, the rest queued): a busy machine must not turn one away
    with running(models, Limits(max_batch=4, max_queue=8)) as url:
        api = client(url)

        def ask(persona: str, seed: int) -> None:
            out = api.chat.completions.create(model=persona, messages=HELLO, temperature=1.0, seed=seed, max_tokens=20)
            got[seed] = out.choices[0].message.content or ""

        threads = [threading.Thread(target=ask, args=a) for a in asks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # a reply reaches its client before the decode loop frees its row and counts it: wait for the count
        deadline = time.monotonic() + 10
        while (status := health(url))["completed"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert status["completed"] == 6 and status["most_rows"] >= 2 and status["active"] == 0
    for persona, seed in asks:
        assert got[seed] == solo(run, persona, Sampling(temperature=1.0, seed=seed), 20)[0]


def _error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value


def test_errors_answer_in_openai_shape_with_their_status(models: dict[str, Served]) -> None:
    with running(models, Limits(max_body=20_000)) as url:
        api = client(url)
        create = api.chat.completions.create
        unknown = _error(lambda: create(model="ambivert", messages=HELLO))
        assert unknown.status_code == 404 and "ambivert" in unknown.message and "introvert" in unknown.message
        assert isinstance(unknown.body, dict) and unknown.body["code"] == "model_not_found"
        bad = {
            "temperature": ({"temperature": 5}, "temperature"),
            "n": ({"n": 2}, "n: one choice per request"),
            "unknown": ({"extra_body": {"best_of": 3}}, "unsupported parameter 'best_of'"),
            "stops": ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
            "max_tokens": ({"max_tokens": 0}, "max_tokens"),
        }
        for case, (kw, message) in bad.items():
            err = _error(lambda kw=kw: create(model="introvert", messages=HELLO, **kw))
            assert err.status_code == 400 and message in err.message, case
        long = [{"role": "user", "content": "walk " * 300}]
        err = _error(lambda: create(model="introvert", messages=long, max_tokens=5))
        assert err.status_code == 400 and "maximum context length is 256 tokens" in err.message
        assert isinstance(err.body, dict) and err.body["code"] == "context_length_exceeded"
        status, body = fetch(f"{url}/chat/completions", b"{not json")
        assert status == 400 and body["error"]["code"] == "invalid_json"
        status, body = fetch(f"{url}/chat/completions", json.dumps({"model": "introvert", "messages": []}).encode())
        assert status == 400 and body["error"]["param"] == "messages"
        status, body = fetch(f"{url}/chat/completions", json.dumps({"model": "x", "messages": HELLO * 400}).encode())
        assert status == 413 and "larger than 20000 bytes" in body["error"]["message"]
        status, body = fetch(f"{url}/files")
        assert status == 404 and "error" in body


def test_an_api_key_is_required_on_every_request(models: dict[str, Served]) -> None:
    with running(models, api_key="s3cret") as url:
        err = _error(lambda: client(url, "wrong").chat.completions.create(model="introvert", messages=HELLO))
        assert err.status_code == 401 and "Authorization: Bearer" in err.message
        assert fetch(url.removesuffix("/v1") + "/health")[0] == 401
        assert fetch(f"{url}/models")[0] == 401
        assert fetch(f"{url}/models", key="s3cret")[0] == 200
        out = client(url, "s3cret").chat.completions.create(model="introvert", messages=HELLO, max_tokens=3)
        assert out.choices[0].finish_reason in ("stop", "length")


def test_a_client_leaving_mid_stream_frees_its_row(models: dict[str, Served], monkeypatch: pytest.MonkeyPatch) -> None:
    """One row, no queue: the stream would take 200 × 50 ms; once its client leaves the row is free at once and
    the next request is served."""
    monkeypatch.setattr(models["introvert"].decoder, "step", slow_steps(models["introvert"], 0.05))
    with running(models, Limits(max_batch=1, max_queue=0)) as url:
        api = client(url)
        stream = api.chat.completions.create(
            model="introvert", messages=HELLO, temperature=1.0, seed=1, max_tokens=200, stream=True
        )
        pieces = iter(stream)
        next(pieces), next(pieces)
        assert health(url)["active"] == 1
        left = time.monotonic()
        stream.close()
        while (status := health(url))["active"] and time.monotonic() - left < 5:
            time.sleep(0.05)
        assert status["active"] == 0 and status["cancelled"] == 1 and time.monotonic() - left < 5
        out = api.chat.completions.create(model="introvert", messages=HELLO, max_tokens=3)
        assert out.choices[0].finish_reason in ("stop", "length")


def test_overload_is_503_while_the_rows_and_the_queue_are_full(
    models: dict[str, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models["introvert"].decoder, "step", slow_steps(models["introvert"], 0.05))
    with running(models, Limits(max_batch=1, max_queue=1)) as url:
        api = client(url)
        kw: dict[str, Any] = {"model": "introvert", "messages": HELLO, "temperature": 1.0, "max_tokens": 100}
        busy = [api.chat.completions.create(stream=True, seed=s, **kw) for s in (1, 2)]  # a row and the queue
        err = _error(lambda: api.chat.completions.create(**kw))
        assert err.status_code == 503 and err.response.headers["retry-after"] == "1"
        assert isinstance(err.body, dict) and err.body["code"] == "overloaded"
        for stream in busy:
            stream.close()
