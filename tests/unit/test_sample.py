import numpy as np

from llmrec_tasks.core import constants as C
from llmrec_tasks.data.contract import normalize
from llmrec_tasks.data.sample import generate_sample


def test_sample_is_deterministic_and_seed_dependent():
    a, b, c = (normalize(generate_sample(seed=s)) for s in (7, 7, 8))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_users_choices_follow_item_topics(sample_data):
    topic = sample_data.items.set_index(C.ITEM_ID)[C.CATEGORIES].str.split("|").str[0]
    inter = sample_data.interactions.assign(topic=lambda d: d[C.ITEM_ID].map(topic))
    # A user's most frequent topic covers far more than the 1/12 a random choice would.
    top_share = inter.groupby(C.USER_ID)["topic"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert np.median(top_share) > 0.3
