"""The serving bundle and the MLflow pyfunc: history from the request counts at once."""

import numpy as np
import pandas as pd
import pytest
import torch

from rec_models.data import ItemVocab, build_sequences, collapse_repeats, interactions, leave_last_out
from rec_models.sasrec import SASRecConfig, train_sasrec
from rec_models.serving import Recommender, write_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, request):
    from rec_models.simulator import FeedbackSimulator, SimulatorConfig

    simulator = FeedbackSimulator(SimulatorConfig(n_items=100, n_users=60, events_per_user=20))
    catalog, events = simulator.catalog(), simulator.events(0)
    vocab = ItemVocab(catalog["item_id"])
    sequences = build_sequences(collapse_repeats(interactions(events)), vocab)
    split = leave_last_out(sequences)
    text = torch.nn.functional.normalize(torch.randn(len(vocab) + 1, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    text[0] = 0
    config = SASRecConfig(n_items=len(vocab), text_dim=16, d_model=16, max_len=20, max_epochs=2)
    backbone, _ = train_sasrec(split, config, text)
    popularity = np.bincount(np.concatenate(split.train.items), minlength=len(vocab) + 1).astype(np.float32)
    histories = dict(zip(sequences.user_ids, zip(sequences.items, sequences.event_types)))
    path = write_bundle(tmp_path_factory.mktemp("bundle"), backbone, vocab,
                        catalog.set_index("item_id")["title"], histories, popularity)
    return path, sequences, vocab, catalog, popularity


def test_known_user_gets_k_unseen_titled_items(bundle):
    path, sequences, vocab, catalog, _ = bundle
    recommender = Recommender(path)
    user = sequences.user_ids[0]
    recs = recommender.recommend(pd.DataFrame({"user_id": [user], "k": [5]}))
    assert recs["rank"].tolist() == [1, 2, 3, 4, 5]
    seen = set(vocab.ids[i - 1] for i in sequences.items[0][-20:])
    assert not seen & set(recs["item_id"])
    titles = catalog.set_index("item_id")["title"]
    assert recs["title"].tolist() == titles.loc[recs["item_id"]].tolist()
    assert recs["score"].is_monotonic_decreasing


def test_recent_items_in_the_request_change_the_list(bundle):
    path, sequences, vocab, *_ = bundle
    recommender = Recommender(path)
    user = sequences.user_ids[0]
    before = recommender.recommend(pd.DataFrame({"user_id": [user]}))
    fresh = before["item_id"].head(3).tolist()  # the user just consumed the top 3
    after = recommender.recommend(pd.DataFrame({"user_id": [user], "recent_item_ids": [fresh]}))
    assert not set(fresh) & set(after["item_id"])
    assert after["item_id"].tolist() != before["item_id"].tolist()


def test_unknown_user_gets_popular_items_and_unknown_ids_are_ignored(bundle):
    path, _, vocab, _, popularity = bundle
    recommender = Recommender(path)
    recs = recommender.recommend(pd.DataFrame({"user_id": ["nobody"], "recent_item_ids": [["no-such-item"]], "k": [3]}))
    expected = [vocab.ids[i - 1] for i in np.argsort(-popularity[1:], kind="stable")[:3] + 1]
    assert recs["item_id"].tolist() == expected
