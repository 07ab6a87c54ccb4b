"""Serving: verified loading (partial/corrupt bundles refused; files memory-mapped, S3 through a
checked cache), recommend(), hot reload."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from llmrec_tasks import publish
from llmrec_tasks.core import constants as C
from llmrec_tasks.core.errors import BundleError
from llmrec_tasks.core.results import Published
from llmrec_tasks.ranking.seqstate import SeqWeights
from llmrec_tasks.serving import recommender as serving
from llmrec_tasks.storage import registry
from llmrec_tasks.storage.registry import bundle_prefix, manifest_key
from llmrec_tasks.storage.store import BUNDLE_CACHE_ENV, S3Store, open_store
from tests.bundle_factory import make_run

NS = C.DEFAULT_NAMESPACE

pytestmark = pytest.mark.usefixtures("toy_ranker_features")


@pytest.fixture
def published(store_uri: str) -> Published:
    return publish.run_publish(*make_run(store_uri))


def rewrite(store_uri: str, version: str, name: str, data: bytes, *, fix_manifest: bool = False) -> None:
    """Replace one bundle file (simulating corruption, or a consistent but bad publish)."""
    store = open_store(store_uri)
    store.put_bytes(f"{bundle_prefix(NS, version)}/{name}", data)
    if fix_manifest:
        key = manifest_key(NS, version)
        manifest = json.loads(store.get_bytes(key))
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        store.put_bytes(key, json.dumps(manifest).encode())


def test_load_current_and_by_version(store_uri: str, published: Published) -> None:
    bundle = serving.load_bundle(store_uri, NS)
    assert bundle.version == published.version
    assert bundle.index.ntotal == len(bundle.item_ids) == bundle.embeddings.shape[0]
    assert bundle.feature_names == ["profile_sim", "log_popularity", "last_item_sim"]
    assert len(bundle.user_row) == 20 and bundle.history("u0").items.size == 8
    assert serving.load_bundle(store_uri, NS, published.version).version == published.version


@pytest.mark.parametrize(
    "name", [C.RANKER_MODEL, C.FAISS_INDEX, C.EMBEDDINGS, C.ITEM_IDS, C.USER_HISTORIES, C.REPORT_HTML]
)
def test_a_flipped_byte_is_refused(store_uri: str, published: Published, name: str) -> None:
    store = open_store(store_uri)
    data = bytearray(store.get_bytes(f"{bundle_prefix(NS, published.version)}/{name}"))
    data[len(data) // 2] ^= 0x01
    rewrite(store_uri, published.version, name, bytes(data))
    with pytest.raises(BundleError, match=f"corrupt: sha256 of {name}"):
        serving.load_bundle(store_uri, NS)


def test_a_truncated_file_is_refused(store_uri: str, published: Published) -> None:
    rewrite(store_uri, published.version, C.RANKER_MODEL, b"tree\n")
    with pytest.raises(BundleError, match=r"corrupt: ranker.txt has 5 bytes"):
        serving.load_bundle(store_uri, NS)


def test_a_missing_file_is_refused(store_uri: str, published: Published) -> None:
    open_store(store_uri).delete(f"{bundle_prefix(NS, published.version)}/{C.FAISS_INDEX}")
    with pytest.raises(BundleError, match=r"partial: index\.faiss cannot be read"):
        serving.load_bundle(store_uri, NS)


def test_a_bundle_without_manifest_or_current_is_refused(store_uri: str) -> None:
    with pytest.raises(BundleError, match="no current bundle"):
        serving.load_bundle(store_uri, NS)
    with pytest.raises(BundleError, match="not published"):
        serving.load_bundle(store_uri, NS, "20240101T000000Z-00000000-000000")


def test_a_manifest_missing_a_required_file_is_refused(store_uri: str, published: Published) -> None:
    store = open_store(store_uri)
    key = manifest_key(NS, published.version)
    manifest = json.loads(store.get_bytes(key))
    del manifest["files"][C.RANKER_MODEL]
    store.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(BundleError, match="manifest lacks"):
        serving.load_bundle(store_uri, NS)


def test_pickled_arrays_are_never_loaded(store_uri: str, published: Published) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}] * 60, dtype=object), allow_pickle=True)
    rewrite(store_uri, published.version, C.EMBEDDINGS, buf.getvalue(), fix_manifest=True)
    with pytest.raises(BundleError, match=r"embeddings\.npy passed its checksum but cannot be loaded"):
        serving.load_bundle(store_uri, NS)


def test_inconsistent_artifacts_are_refused(store_uri: str, published: Published) -> None:
    ids = [f"i{n}" for n in range(10)]
    rewrite(store_uri, published.version, C.ITEM_IDS, json.dumps(ids).encode(), fix_manifest=True)
    with pytest.raises(BundleError, match="must agree"):
        serving.load_bundle(store_uri, NS)


@pytest.fixture
def recommender(store_uri: str, published: Published) -> serving.Recommender:
    return serving.Recommender(serving.load_bundle(store_uri, NS))


def test_known_user_gets_personalized_items_with_reasons(recommender: serving.Recommender) -> None:
    result = recommender.recommend(user_id="u1", k=5)
    assert result.strategy == "personalized" and result.history_length == 8
    assert len(result.items) == 5
    scores = [i.score for i in result.items]
    assert scores == sorted(scores, reverse=True)
    seen = {recommender.bundle.item_ids[r] for r in recommender.bundle.history("u1").items}
    assert not seen & {i.item_id for i in result.items}
    # The toy ranker's features have no wording: each item reads "similar to" a history item.
    history_titles = {recommender.bundle.titles[r] for r in recommender.bundle.history("u1").items}
    for item in result.items:
        quoted = re.fullmatch(r"similar to “(.+)” you interacted with", item.reason)
        assert quoted and quoted.group(1) in history_titles
        assert item.signals and {s.feature for s in item.signals} <= set(recommender.bundle.feature_names)
    # u1 watched topic-1 items: recommendations stay on topic 1 (clustered embeddings).
    assert all("(topic 1)" in i.title for i in result.items)


def test_recent_events_personalise_the_request(recommender: serving.Recommender) -> None:
    topic2 = ["i2", "i5", "i8"]
    anonymous = recommender.recommend(recent=topic2, k=5)
    assert anonymous.strategy == "personalized" and anonymous.history_length == 3
    assert all("(topic 2)" in i.title for i in anonymous.items)
    assert not set(topic2) & {i.item_id for i in anonymous.items}
    # A topic-1 user who just interacted with topic-2 items gets topic-2 items in the mix.
    before = recommender.recommend(user_id="u1", k=10)
    after = recommender.recommend(user_id="u1", recent=[serving.Event(i, 5.0) for i in topic2], k=10)
    assert after.history_length == 11
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items]


def test_unknown_users_and_items_fall_back_to_popular(recommender: serving.Recommender) -> None:
    result = recommender.recommend(user_id="nobody", k=4)
    assert result.strategy == "popular" and result.history_length == 0
    assert len(result.items) == 4
    assert all(re.fullmatch(r"popular: chosen \d+ times? by others", i.reason) for i in result.items)
    assert all(i.signals == [] for i in result.items)
    counts = [i.score for i in result.items]
    assert counts == sorted(counts, reverse=True)
    mixed = recommender.recommend(recent=["not-an-item", "i3"], k=3)
    assert mixed.ignored_item_ids == ["not-an-item"] and mixed.strategy == "personalized"
    only_unknown = recommender.recommend(recent=["not-an-item"], k=3)
    assert only_unknown.strategy == "popular" and only_unknown.ignored_item_ids == ["not-an-item"]


def test_k_is_clamped_to_the_catalog(recommender: serving.Recommender) -> None:
    result = recommender.recommend(user_id="nobody", k=1000)
    assert len(result.items) == len(recommender.bundle.item_ids)


def test_smoke_check_answers_sample_queries(recommender: serving.Recommender) -> None:
    summary = serving.smoke_check(recommender)
    assert summary["queries"] == 5 and summary["max_ms"] >= 0


def test_holder_picks_up_a_new_current_and_survives_a_bad_one(store_uri: str, published: Published) -> None:
    holder = serving.BundleHolder(store_uri, NS, poll_seconds=3600)
    assert holder.refresh() is True and holder.recommender.bundle.version == published.version
    assert holder.refresh() is False
    second = publish.run_publish(*make_run(store_uri, cutoff=datetime(2024, 2, 2, tzinfo=UTC), seed=1))
    assert holder.refresh() is True and holder.recommender.bundle.version == second.version
    # A corrupt third bundle, promoted without the check: the holder keeps serving the second.
    third = publish.run_publish(
        *make_run(store_uri, cutoff=datetime(2024, 2, 3, tzinfo=UTC), seed=2, promote=False)
    )
    rewrite(store_uri, third.version, C.RANKER_MODEL, b"garbage")
    publish.promote(store_uri, NS, third.version, check=False)
    assert holder.refresh() is False
    assert holder.recommender.bundle.version == second.version
    assert holder.pointer_version == third.version and "corrupt" in holder.last_error


def test_real_ranker_scorer_serves_the_ranking_stage_features(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default scorer: candidates + features from llmrec_tasks.ranking.sources/features."""
    monkeypatch.undo()  # the real scorer, not the toy one
    from llmrec_tasks.ranking.features import FEATURE_NAMES

    result = publish.run_publish(*make_run(store_uri, real_features=True))
    assert result.promoted
    bundle = serving.load_bundle(store_uri, NS)
    assert bundle.feature_names == FEATURE_NAMES
    rec = serving.Recommender(bundle).recommend(user_id="u4", recent=["i7"], k=5)
    assert rec.strategy == "personalized" and len(rec.items) == 5
    seen = {bundle.item_ids[r] for r in bundle.history("u4").items} | {"i7"}
    assert not seen & {i.item_id for i in rec.items}


def test_path_contributions_add_up_to_the_score(recommender: serving.Recommender) -> None:
    bundle = recommender.bundle
    x = np.random.default_rng(0).normal(size=(25, len(bundle.feature_names)))
    leaves = bundle.booster.predict(x, pred_leaf=True)
    contrib = bundle.path_contrib[np.arange(leaves.shape[1])[None, :], leaves].sum(axis=1)
    roots = [t["tree_structure"] for t in bundle.booster.dump_model()["tree_info"]]
    bias = sum(r.get("internal_value", r.get("leaf_value", 0.0)) for r in roots)
    raw = bundle.booster.predict(x, raw_score=True)
    np.testing.assert_allclose(contrib.sum(axis=1) + bias, raw, rtol=1e-4, atol=1e-4)
    assert np.abs(contrib).sum() > 0


def test_an_ivfpq_bundle_serves_with_the_exact_rerank_it_was_tuned_with(
    store_uri: str, published: Published
) -> None:
    from llmrec_tasks.retrieval import index as ix

    version = published.version
    vectors = serving.load_bundle(store_uri, NS, version).embeddings
    choice = {"kind": "ivfpq", "nlist": 1, "pq_m": 4}
    pq = ix.build_index(vectors, choice)
    info = {**choice, "search_param": 1, "refine_factor": 8}
    rewrite(store_uri, version, C.FAISS_INDEX, ix.serialize(pq), fix_manifest=True)
    rewrite(store_uri, version, C.INDEX_INFO, json.dumps(info).encode(), fix_manifest=True)
    bundle = serving.load_bundle(store_uri, NS, version)
    assert isinstance(bundle.index, ix.RefinedIndex) and bundle.index.factor == 8
    scores, ids = bundle.index.search(vectors[:5], 3)
    exact_scores, exact_ids = ix.exact_top_k(vectors, vectors[:5], 3)
    assert ids.tolist() == exact_ids.tolist()
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


def test_every_ranker_feature_reads_as_words() -> None:
    """A new feature without a template would show its internal name (or nothing): it must get one."""
    from llmrec_tasks.ranking.features import FEATURE_NAMES
    from llmrec_tasks.ranking.relations import RELATIONS

    assert set(FEATURE_NAMES) <= set(serving.FEATURE_REASONS)
    for name, template in serving.FEATURE_REASONS.items():
        assert not any(feature in template.text for feature in FEATURE_NAMES), name
        assert "_" not in template.text and template.text.count("{") == template.anchored, name
        assert template.relation in (None, *RELATIONS), name
        assert template.anchored or (template.relation is None and template.position is None), name


@pytest.fixture
def real_recommender(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> serving.Recommender:
    monkeypatch.undo()  # the ranking stage's scorer, not the toy one
    publish.run_publish(*make_run(store_uri, real_features=True))
    return serving.Recommender(serving.load_bundle(store_uri, NS))


def anchored_patterns() -> dict[str, tuple[re.Pattern[str], str | None]]:
    """Each item-anchored template as a regex capturing the history title, with its relation."""
    return {
        t.text: (re.compile(re.escape(t.text).replace(re.escape("{anchor}"), "(.+?)")), t.relation)
        for t in serving.FEATURE_REASONS.values()
        if t.anchored
    }


def test_reasons_are_words_naming_the_users_items(real_recommender: serving.Recommender) -> None:
    from llmrec_tasks.ranking.features import FEATURE_NAMES

    bundle = real_recommender.bundle
    patterns = anchored_patterns()
    anchored = relations_checked = 0
    for user in [f"u{n}" for n in range(0, 20, 2)]:
        history = bundle.history(user).items
        titles = {bundle.titles[r]: int(r) for r in history}
        for item in real_recommender.recommend(user_id=user, k=5).items:
            assert item.reason and not any(name in item.reason for name in FEATURE_NAMES)
            assert "_" not in item.reason and "+0." not in item.reason
            # Every quoted title is one of this user's items.
            assert set(re.findall(r"“(.+?)”", item.reason)) <= set(titles), (user, item.reason)
            for pattern, relation in patterns.values():
                for title in pattern.findall(item.reason):
                    anchored += 1
                    if relation is not None:  # the user's item most linked to this one, or the last
                        relations_checked += 1
                        links = real_recommender.relations[relation][:, [bundle.item_row[item.item_id]]]
                        link, strongest = (
                            links[titles[title], 0],
                            links[history[-serving.REASON_ITEMS :]].max(),
                        )
                        assert link > 0 and (link == strongest or titles[title] == history[-1]), item.reason
            contributions = [abs(s.contribution) for s in item.signals]
            assert item.signals and contributions == sorted(contributions, reverse=True)
            assert {s.feature for s in item.signals} <= set(FEATURE_NAMES)
    assert anchored and relations_checked  # the toy data exercises both kinds of anchor


def test_a_reason_claims_only_what_the_features_show(real_recommender: serving.Recommender) -> None:
    """A feature is worded only when its value stands out among the candidates as the template says."""
    bundle = real_recommender.bundle
    texts = [t.text for t in serving.FEATURE_REASONS.values()]
    single = {  # wordings only one feature uses: a phrase identifies its feature
        t.text: (bundle.feature_names.index(name), t.when)
        for name, t in serving.FEATURE_REASONS.items()
        if texts.count(t.text) == 1 and not t.anchored and name in bundle.feature_names
    }
    claims = 0
    for user in [f"u{n}" for n in range(20)]:
        result = real_recommender.recommend(user_id=user, k=5)
        candidates, matrix = real_recommender.scorer(bundle.history(user), time.time())
        medians = np.median(np.where(np.isnan(matrix), -np.inf, matrix), axis=0)
        rows = {bundle.item_ids[c]: r for r, c in enumerate(candidates)}
        for item in result.items:
            for phrase in item.reason.split("; "):
                if phrase in single:
                    claims += 1
                    j, when = single[phrase]
                    value = matrix[rows[item.item_id], j]
                    assert value > medians[j] if when == "high" else value < medians[j], (phrase, value)
    assert claims


def bytes_loaded(store_uri: str, version: str) -> serving.Bundle:
    """The bundle parsed the way serving did before it mapped files: every file read into memory
    and parsed from the bytes."""
    import faiss
    import lightgbm

    store = open_store(store_uri)
    manifest = registry.read_manifest(store, NS, version)
    blobs = {name: store.get_bytes(registry.bundle_key(NS, version, name)) for name in manifest["files"]}
    artifacts = serving.Artifacts(
        embeddings=np.load(io.BytesIO(blobs[C.EMBEDDINGS]), allow_pickle=False),
        item_ids=json.loads(blobs[C.ITEM_IDS]),
        index=faiss.deserialize_index(np.frombuffer(blobs[C.FAISS_INDEX], dtype=np.uint8)),
        booster=lightgbm.Booster(model_str=blobs[C.RANKER_MODEL].decode()),
        spec=json.loads(blobs[C.FEATURE_SPEC]),
        tables={n: pd.read_parquet(io.BytesIO(d)) for n, d in blobs.items() if n.endswith(".parquet")},
        seq=SeqWeights.from_bytes(blobs[C.SEQ_MODEL]) if C.SEQ_MODEL in blobs else None,
    )
    return serving.assemble_bundle(
        NS, version, store.uri_for(bundle_prefix(NS, version)), manifest, artifacts
    )


def mapped_files() -> set[Path]:
    """Files this process has memory-mapped (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {Path(parts[5]) for parts in (line.split(maxsplit=5) for line in lines) if len(parts) == 6}


def test_a_file_store_bundle_is_mapped_from_the_stores_own_files(
    store_uri: str, published: Published
) -> None:
    bundle = serving.load_bundle(store_uri, NS)
    folder = Path(store_uri.removeprefix("file://")) / bundle_prefix(NS, published.version)
    assert isinstance(bundle.embeddings, np.memmap) and not bundle.embeddings.flags.writeable
    assert Path(bundle.embeddings.filename) == folder / C.EMBEDDINGS
    assert {folder / C.EMBEDDINGS, folder / C.FAISS_INDEX} <= mapped_files()


def test_the_mapped_bundle_answers_exactly_as_one_read_into_memory(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the ranking stage's scorer, which reads embeddings and index
    version = publish.run_publish(*make_run(store_uri, real_features=True)).version
    mapped = serving.Recommender(serving.load_bundle(store_uri, NS, version))
    in_memory = serving.Recommender(bytes_loaded(store_uri, version))
    assert isinstance(mapped.bundle.embeddings, np.memmap)
    assert not isinstance(in_memory.bundle.embeddings, np.memmap)
    for query in [{"user_id": f"u{n}"} for n in range(20)] + [
        {"recent": ["i3", "i7"]},
        {"user_id": "nobody"},
    ]:
        assert dataclasses.asdict(mapped.recommend(**query, k=10)) == dataclasses.asdict(
            in_memory.recommend(**query, k=10)
        )


def test_an_s3_bundle_is_served_from_a_checked_local_cache(
    s3_store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(BUNDLE_CACHE_ENV, str(cache))
    version = publish.run_publish(*make_run(s3_store_uri)).version  # its serving check fills the cache
    downloads: list[str] = []
    download = S3Store._download_checked

    def counted(self: S3Store, key: str, *args: Any) -> None:
        downloads.append(key.rsplit("/", 1)[1])
        download(self, key, *args)

    monkeypatch.setattr(S3Store, "_download_checked", counted)
    bundle = serving.load_bundle(s3_store_uri, NS)
    cached = open_store(s3_store_uri).cache_path(registry.bundle_key(NS, version, C.EMBEDDINGS))
    assert downloads == [] and cached.is_relative_to(cache)
    assert isinstance(bundle.embeddings, np.memmap) and Path(bundle.embeddings.filename) == cached

    original = np.array(bundle.embeddings)  # a copy: the edit below is in place, under the mapping
    tampered = bytearray(cached.read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    cached.write_bytes(bytes(tampered))
    again = serving.load_bundle(s3_store_uri, NS)
    assert downloads == [C.EMBEDDINGS]
    np.testing.assert_array_equal(again.embeddings, original)

    rewrite(s3_store_uri, version, C.EMBEDDINGS, bytes(tampered))  # the object itself is bad now
    cached.write_bytes(bytes(tampered))
    with pytest.raises(BundleError, match=f"corrupt: sha256 of {re.escape(C.EMBEDDINGS)}"):
        serving.load_bundle(s3_store_uri, NS)


def test_timings_name_each_stage_of_the_ranking_scorer(real_recommender: serving.Recommender) -> None:
    timings: dict[str, float] = {}
    result = real_recommender.recommend(user_id="u1", k=5, timings=timings)
    assert list(timings) == ["history", "candidates", "features", "score", "reasons"]
    assert all(seconds >= 0 for seconds in timings.values())
    untimed = real_recommender.recommend(user_id="u1", k=5)
    assert [i.item_id for i in result.items] == [i.item_id for i in untimed.items]  # the same answer
    cold: dict[str, float] = {}
    real_recommender.recommend(user_id="someone-new", k=5, timings=cold)
    assert list(cold) == ["history", "popular"]


def test_timings_of_another_scorer_take_it_as_one_stage(recommender: serving.Recommender) -> None:
    timings: dict[str, float] = {}
    recommender.recommend(user_id="u1", k=3, timings=timings)
    assert list(timings) == ["history", "scorer", "score", "reasons"]
