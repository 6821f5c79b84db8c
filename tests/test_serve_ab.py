"""A/B routes: a providers-file route split by weight between variants, sticky per user;
per-variant metrics, model_version in answers, a variant unloaded (its users go to the rest and
an alert fires), the feedback comparison with its significance test, and promoting the winner."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from accounts_helpers import make_settings
from alert_helpers import FAST, admin_session, alert_status, fast_rules, wait_for
from openai import OpenAI
from provider_helpers import metric, write_providers
from server_helpers import running_server

from semilla.serve.abtest import two_proportion_z_test
from semilla.serve.app import create_app
from semilla.serve.backends.split import rank_variants
from semilla.serve.providers import ProvidersFileError, load_providers
from semilla.serve.registry import load_models

# Each user's variant is fixed by a hash (rendezvous), so as a sample it is Bernoulli(0.7): the
# share of REQUESTS = 300 users has a standard deviation of sqrt(0.7 * 0.3 / 300) = 0.026, and the
# +-0.1 bound (3.8 deviations) fails a correct 70/30 split for one user set in 6,000 (these users
# give 0.65, every run). A 50/50 split lands 0.2 away; any routing other than the weighted ranking
# fails the per-user check against rank_variants, and the pure ranking is held to +-0.01 over
# 20,000 users above.
REQUESTS = 300


def test_weights_are_normalised_and_bad_splits_refused_with_their_line(tmp_path: Path):
    path = write_providers(
        tmp_path / "p.yaml", "routes:\n  ab: {split: {a: 70, b: 30}}\n  ab2: {split: {a: 1, b: 1, c: 2}}\n"
    )
    file = load_providers(path, ["a", "b", "c"])
    assert file.splits == {"ab": {"a": 0.7, "b": 0.3}, "ab2": {"a": 0.25, "b": 0.25, "c": 0.5}}
    bad = write_providers(
        tmp_path / "bad.yaml",
        "routes:\n"
        "  zero:\n    split: {a: 0, b: 1}\n"
        "  negative:\n    split: {a: -1, b: 1}\n"
        "  alone:\n    split: {a: 1}\n"
        "  unknown:\n    split: {a: 1, nope: 1}\n"
        "  text:\n    split: {a: lots, b: 1}\n",
    )
    with pytest.raises(ProvidersFileError) as e:
        load_providers(bad, ["a", "b"])
    message = str(e.value)
    assert "bad.yaml:3: route 'zero': the weight of 'a' must be a number above 0, got 0" in message
    assert "bad.yaml:5: route 'negative': the weight of 'a' must be a number above 0, got -1" in message
    assert "bad.yaml:6: route 'alone': an A/B route is {split:" in message
    assert "bad.yaml:9: 'nope' is no model or provider" in message
    assert "route 'text': the weight of 'a' must be a number above 0, got 'lots'" in message


def test_rendezvous_assignment_matches_the_weights_and_moves_only_a_removed_variants_users():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    users = [f"user-{i}" for i in range(20_000)]
    first = {u: rank_variants("r", weights, u)[0] for u in users}
    shares = Counter(first.values())
    for variant, weight in weights.items():
        assert abs(shares[variant] / len(users) - weight) < 0.01, (variant, shares)
    without_b = {u: rank_variants("r", {"a": 0.5, "c": 0.2}, u)[0] for u in users}
    assert all(without_b[u] == v for u, v in first.items() if v != "b")  # a's and c's users stay put
    moved = Counter(without_b[u] for u, v in first.items() if v == "b")
    assert abs(moved["a"] / sum(moved.values()) - 0.5 / 0.7) < 0.02  # b's users spread by weight


def test_two_proportion_z_test_matches_the_textbook():
    # 60/100 good against 45/100: pooled 0.525, se 0.0706, z = -2.12, p = 0.034
    result = two_proportion_z_test(60, 100, 45, 100)
    assert result["z"] == pytest.approx(-2.1239, abs=1e-3)
    assert result["p_value"] == pytest.approx(0.03368, abs=1e-4) and result["significant"]
    assert not two_proportion_z_test(6, 10, 5, 10)["significant"]
    assert two_proportion_z_test(0, 0, 3, 4) is None and two_proportion_z_test(3, 3, 4, 4) is None


def test_a_70_30_route_splits_requests_by_the_weighted_ranking_sticks_per_user_and_counts_each_variant(
    tiny_run: Path, tmp_path: Path
):
    providers = write_providers(
        tmp_path / "providers.yaml", "routes:\n  ab: {split: {tiny: 70, second: 30}}\n"
    )
    settings = make_settings(tmp_path, providers=providers, alert_rules=fast_rules(tmp_path / "r.yml"),
                             max_slots=8, queue_size=64, **FAST)  # fmt: skip
    app = create_app(settings, load_models([("tiny", str(tiny_run)), ("second", str(tiny_run))]))
    variants = ("tiny", "second")
    before = {v: (metric("semilla_ab_requests_total", route="ab", variant=v),
                  metric("semilla_ab_latency_seconds_count", route="ab", variant=v),
                  metric("semilla_ab_completion_tokens_total", route="ab", variant=v),
                  metric("semilla_ab_errors_total", route="ab", variant=v)) for v in variants}  # fmt: skip
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.headers.update(admin_session(client))

        def ask(user: str) -> dict:
            body = {"model": "ab", "user": user, "max_tokens": 1, "temperature": 0,
                    "messages": [{"role": "user", "content": "Hola"}]}  # fmt: skip
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.headers["x-semilla-variant"] == r.json()["model_version"]
            return r.json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, [f"u{i}" for i in range(REQUESTS)]))
            again = list(pool.map(ask, [f"u{i}" for i in range(0, REQUESTS, 10)]))
        share = sum(a["model_version"] == "tiny" for a in answers) / REQUESTS
        assert abs(share - 0.7) <= 0.1, share
        weights = {"tiny": 0.7, "second": 0.3}
        ranked = [rank_variants("ab", weights, f"end-user:u{i}")[0] for i in range(REQUESTS)]
        assert [a["model_version"] for a in answers] == ranked  # each user's variant is its ranking's first
        assert all(a["model"] == a["model_version"] for a in answers)  # the variant's own model answered
        assert [a["model_version"] for a in again] == [a["model_version"] for a in answers[::10]]  # sticky

        for v in variants:  # per-variant metrics agree with what the answers say
            mine = [a for a in answers + again if a["model_version"] == v]
            after = (metric("semilla_ab_requests_total", route="ab", variant=v),
                     metric("semilla_ab_latency_seconds_count", route="ab", variant=v),
                     metric("semilla_ab_completion_tokens_total", route="ab", variant=v),
                     metric("semilla_ab_errors_total", route="ab", variant=v))  # fmt: skip
            requests, timed, tokens, errors = (x - y for x, y in zip(after, before[v], strict=True))
            assert requests == timed == len(mine), v
            assert tokens == sum(a["usage"]["completion_tokens"] for a in mine) and errors == 0, v
        report = client.get("/admin/ab").json()["data"][0]
        assert report["route"] == "ab" and report["control"] == "tiny"
        assert {v["variant"]: v["weight"] for v in report["variants"]} == {"tiny": 0.7, "second": 0.3}

        # the variant 'second' is unloaded: its users go to 'tiny', the others keep theirs, an alert fires
        seconds = [f"u{i}" for i, a in enumerate(answers) if a["model_version"] == "second"][:20]
        assert client.delete("/admin/models/second").status_code == 204
        with ThreadPoolExecutor(8) as pool:
            moved = list(pool.map(ask, seconds))
        assert {a["model_version"] for a in moved} == {"tiny"}
        wait_for(lambda: alert_status(client, "SemillaABVariantDown") == "firing")
        firing = client.get("/admin/alerts").json()["firing"]
        down = next(a for a in firing if a["name"] == "SemillaABVariantDown")
        assert down["labels"]["variant"] == "second" and down["labels"]["route"] == "ab"
        assert [v["up"] for v in client.get("/admin/ab").json()["data"][0]["variants"]] == [True, False]
        assert client.post("/admin/models", json={"name": "second", "path": str(tiny_run)}).status_code == 201
        wait_for(lambda: alert_status(client, "SemillaABVariantDown") == "resolved")
        assert ask(seconds[0])["model_version"] == "second"  # back to its own variant

        # feedback: users like 'tiny' more; the z-test says it is significant; promote the winner.
        # All good against all bad gives z = sqrt(ratings): 100 give p = 1.5e-23, far past 1e-6.
        for a in answers[:100]:
            rating = 1 if a["model_version"] == "tiny" else -1
            r = client.post("/feedback", json={"completion_id": a["id"], "rating": rating})
            assert r.status_code == 201, r.text
        tiny, second = client.get("/admin/ab").json()["data"][0]["variants"]
        assert tiny["feedback"]["score"] == 1.0 and second["feedback"]["score"] == 0.0
        assert second["vs_control"]["significant"] and second["vs_control"]["p_value"] < 1e-6
        assert client.post("/admin/ab/ab/promote", json={"variant": "nope"}).status_code == 400
        assert client.post("/admin/ab/none/promote", json={"variant": "tiny"}).status_code == 404
        r = client.post("/admin/ab/ab/promote", json={"variant": "tiny"})
        assert r.status_code == 200 and r.json()["split"] == {"tiny": 1.0}
        assert ask(seconds[1])["model_version"] == "tiny"  # no restart: everyone gets the winner


def test_a_streamed_answer_names_its_variant_and_is_counted_when_it_ends(tiny_run: Path, tmp_path: Path):
    providers = write_providers(tmp_path / "providers.yaml", "routes:\n  ab: {split: {tiny: 1, second: 1}}\n")
    app = create_app(make_settings(tmp_path, providers=providers),
                     load_models([("tiny", str(tiny_run)), ("second", str(tiny_run))]))  # fmt: skip
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        key = admin_session(http)["Authorization"].removeprefix("Bearer ")
        client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        variant = rank_variants("ab", {"tiny": 0.5, "second": 0.5}, "end-user:ana")[0]
        labels = {"route": "ab", "variant": variant}
        before = (metric("semilla_ab_latency_seconds_count", **labels),
                  metric("semilla_ab_completion_tokens_total", **labels))  # fmt: skip
        stream = client.chat.completions.create(model="ab", user="ana", max_tokens=4, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Hola"}])  # fmt: skip
        chunks = list(stream)
        assert {c.model_extra["model_version"] for c in chunks} == {variant}
        assert {c.model for c in chunks} == {variant}
        generated = chunks[-1].usage.completion_tokens
        after = (metric("semilla_ab_latency_seconds_count", **labels),
                 metric("semilla_ab_completion_tokens_total", **labels))  # fmt: skip
        assert (after[0] - before[0], after[1] - before[1]) == (1, generated)
