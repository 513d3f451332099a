"""Tests for rec_models.models (SASRec) on a tiny synthetic catalog with a strong sequential pattern.

Items 1..29 form a cycle: users consume runs i, i+1, i+2, ... (wrapping after 29). Item 30
never occurs in any sequence but has exactly the text embedding of item 6 ("cold twin");
item 31 never occurs either and has its own random text ("cold control").
"""

import copy

import numpy as np
import pytest
import torch

from rec_models.data import UserSequences, leave_last_out
from rec_models.evaluation import PopularityRecommender, evaluate_ranking
from rec_models.models import (
    LOSSES,
    SASRecBackbone,
    SASRecConfig,
    build_training_windows,
    load_backbone,
    recommend,
    sampled_softmax_loss,
    save_backbone,
    train_sasrec,
)
from rec_models.models.training import SASRecModule

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models train fastest on one thread

CYCLE = 29
COLD_TWIN, COLD_CONTROL = 30, 31
N_ITEMS = 31
TEXT_DIM = 16


def cycle_split(n_users: int = 150, seed: int = 0):
    rng = np.random.default_rng(seed)
    items, types = [], []
    for _ in range(n_users):
        start, length = rng.integers(0, CYCLE), rng.integers(6, 16)
        items.append(((start + np.arange(length)) % CYCLE + 1).astype(np.int64))
        types.append(rng.integers(1, 4, size=length).astype(np.int64))
    return leave_last_out(UserSequences([f"u{u}" for u in range(n_users)], items, types))


def random_split(n_users: int = 60, seed: int = 1):
    """No pattern at all: validation accuracy plateaus at once (for early stopping)."""
    rng = np.random.default_rng(seed)
    items = [
        rng.integers(1, CYCLE + 1, size=rng.integers(6, 12)).astype(np.int64)
        for _ in range(n_users)
    ]
    types = [np.full(len(s), 2, dtype=np.int64) for s in items]
    return leave_last_out(UserSequences([f"u{u}" for u in range(n_users)], items, types))


def text_table() -> torch.Tensor:
    text = torch.randn(N_ITEMS + 1, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    text[0] = 0.0
    text[COLD_TWIN] = text[6]
    return text


def small_config(**overrides) -> SASRecConfig:
    settings = dict(
        n_items=N_ITEMS, text_dim=TEXT_DIM, d_model=32, max_len=16, dropout=0.1, lr=1e-2,
        batch_size=32, max_epochs=15, patience=3,
    )
    settings.update(overrides)
    return SASRecConfig(**settings)


@pytest.fixture(scope="module")
def trained(single_thread):
    split = cycle_split()
    backbone, history = train_sasrec(split, small_config(), text_table())
    return split, backbone, history


def test_a_frozen_item_table_scores_as_the_live_one_and_is_forgotten_after(trained):
    """Validation and evaluation compute the item table once per pass: same scores; the
    previous state comes back after the pass; a table frozen before a weight change is stale."""
    split, backbone, _ = trained
    val = split.val_histories()
    live = backbone.score_histories(val.items, val.event_types)
    with backbone.item_table_frozen():
        assert backbone._frozen_items is not None
        frozen = backbone.score_histories(val.items, val.event_types)
    assert backbone._frozen_items is None
    assert torch.allclose(frozen, live, atol=1e-6)
    changed = copy.deepcopy(backbone)
    with changed.item_table_frozen(), torch.no_grad():
        changed.id_embedding.weight.mul_(2.0)
        stale = changed.score_histories(val.items, val.event_types)
    assert torch.allclose(stale, live, atol=1e-6)  # the frozen table, not the changed weights
    assert not torch.allclose(changed.score_histories(val.items, val.event_types), live, atol=1e-3)


def test_training_beats_popularity_and_returns_the_best_epoch(trained):
    split, backbone, history = trained
    val = split.val_histories()
    pop = PopularityRecommender().fit(split.train, N_ITEMS)
    pop_ndcg = evaluate_ranking(pop.score, val.items, split.val_targets, N_ITEMS)["ndcg@10"]

    sasrec = evaluate_ranking(
        backbone.score_histories, val.items, split.val_targets, N_ITEMS, event_types=val.event_types
    )
    assert sasrec["ndcg@10"] > pop_ndcg + 0.3
    # The returned weights are those of the best validation epoch.
    best = max(epoch["val_ndcg@10"] for epoch in history["epochs"])
    assert history["best_val_ndcg@10"] == pytest.approx(best)
    assert sasrec["ndcg@10"] == pytest.approx(best, abs=1e-5)
    assert not backbone.training and backbone._frozen_items is None  # validation's item table is not kept

    first = history["epochs"][0]
    assert {"epoch", "train_loss", "val_ndcg@10", "val_hr@10", "epoch_s"} <= set(first)
    assert history["epochs"][-1]["train_loss"] < first["train_loss"]
    assert history["sequences_per_s"] > 0 and history["train_s"] > 0
    print(
        f"\n{history['n_windows']} windows, {len(history['epochs'])} epochs, "
        f"{history['train_s']:.2f} s, {history['sequences_per_s']:.0f} sequences/s, "
        f"epoch {np.mean([e['epoch_s'] for e in history['epochs']]):.3f} s"
    )


def test_cold_item_is_scored_from_its_text(trained):
    _, backbone, _ = trained
    # Items never seen in training keep an all-zero ID embedding.
    assert torch.count_nonzero(backbone.id_embedding.weight[[COLD_TWIN, COLD_CONTROL]]) == 0

    top, _ = recommend(backbone, [np.array([3, 4, 5])], k=3)
    assert top[0, 0] == 6  # the pattern itself is learned
    assert COLD_TWIN in top[0]  # the text twin of the true next item ranks high too

    # Across all contexts "i-2, i-1, i" the twin's score follows item 6's score; an equally
    # cold item with other text does not.
    contexts = [(np.arange(i - 2, i + 1) % CYCLE) + 1 for i in range(CYCLE)]
    scores = backbone.score_histories(contexts).numpy()
    twin_corr = np.corrcoef(scores[:, 6], scores[:, COLD_TWIN])[0, 1]
    control_corr = np.corrcoef(scores[:, 6], scores[:, COLD_CONTROL])[0, 1]
    assert twin_corr > 0.8
    assert twin_corr > control_corr


def test_recommend_excludes_history_and_sorts_scores(trained):
    _, backbone, _ = trained
    histories = [np.array([1, 2, 3, 4]), np.array([20, 21]), np.zeros(0, dtype=np.int64)]
    top, scores = recommend(backbone, histories, k=5)
    assert top.shape == scores.shape == (3, 5)
    assert top.dtype == np.int64
    for row, history in zip(top, histories):
        assert not set(row.tolist()) & set(history.tolist())
        assert 0 not in row
    assert np.all(np.diff(scores, axis=1) <= 0)

    with_history, _ = recommend(backbone, [np.array([5, 6])], k=N_ITEMS, exclude_history=False)
    assert {5, 6} <= set(with_history[0].tolist())


def test_grow_keeps_scores_of_existing_items(trained):
    _, backbone, _ = trained
    histories = [np.array([3, 4, 5]), np.array([10, 11, 12, 13])]
    before = backbone.score_histories(histories)

    grown = copy.deepcopy(backbone)
    extra = torch.randn(2, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    extra[0] = text_table()[6]
    grown.grow(torch.cat([grown.text_embeddings, extra]))
    after = grown.score_histories(histories)

    assert grown.config.n_items == N_ITEMS + 2
    assert after.shape == (2, N_ITEMS + 3)
    torch.testing.assert_close(after[:, : N_ITEMS + 1], before, rtol=0, atol=1e-5)
    assert torch.count_nonzero(grown.id_embedding.weight[N_ITEMS + 1 :]) == 0
    # A brand-new item with item 6's text scores exactly like the (equally untrained) cold twin.
    torch.testing.assert_close(after[:, N_ITEMS + 1], after[:, COLD_TWIN])
    with pytest.raises(ValueError, match="shrink"):
        grown.grow(text_table())


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    _, backbone, _ = trained
    path = tmp_path / "sasrec.pt"
    save_backbone(backbone, path)
    loaded = load_backbone(path)

    histories = [np.array([3, 4, 5]), np.array([7])]
    assert loaded.config == backbone.config
    assert torch.equal(loaded.score_histories(histories), backbone.score_histories(histories))
    assert torch.equal(loaded.text_embeddings, backbone.text_embeddings)


def test_warm_start_grows_and_trains_only_the_subset(trained):
    split, backbone, _ = trained
    config = small_config(n_items=N_ITEMS + 1, max_epochs=1)
    text = torch.cat([text_table(), torch.ones(1, TEXT_DIM)])
    fine_tuned, history = train_sasrec(
        split, config, text, init_backbone=backbone, users_subset=list(range(10))
    )

    assert fine_tuned.config.n_items == N_ITEMS + 1
    assert len(history["epochs"]) == 1
    assert history["n_windows"] == 10  # one window per user: sequences are shorter than max_len
    # The new item is not in training, so its ID row stays zero.
    assert torch.count_nonzero(fine_tuned.id_embedding.weight[N_ITEMS + 1]) == 0
    # Warm start keeps most of the accuracy after one short epoch.
    assert history["best_val_ndcg@10"] > 0.5 * max(e["val_ndcg@10"] for e in trained[2]["epochs"])
    assert backbone.config.n_items == N_ITEMS  # the initial model is left as it was
    # One text table, not a copy per network: the fine-tune holds the caller's; loading another
    # state replaces the table instead of writing into it (the caller's is left as it was).
    assert fine_tuned.text_embeddings.data_ptr() == text.data_ptr()
    before = text.clone()
    state = fine_tuned.state_dict()
    state["text_embeddings"] = torch.zeros_like(text)
    fine_tuned.load_state_dict(state)
    assert torch.equal(text, before) and fine_tuned.text_embeddings.abs().sum() == 0
    with pytest.raises(ValueError, match="text_embeddings must have shape"):
        fine_tuned.load_state_dict({**state, "text_embeddings": torch.zeros(3, TEXT_DIM)})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_sampled_loss_step_computes_only_the_rows_it_reads():
    """With a sampled loss a training step builds the item table of the batch's items and its
    negatives only: the same loss and gradients as from the whole table."""
    config = small_config(loss="sampled", n_negatives=8, dropout=0.0, item_bias=True, id_dropout=0.3)
    torch.manual_seed(1)
    module = SASRecModule(SASRecBackbone(config, text_table()))
    assert module.compact_item_table
    items = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    batch = [items, torch.ones_like(items), torch.tensor([[0, 0, 4, 9], [6, 7, 8, 10]])]
    results = []
    for compact in (True, False):
        module.compact_item_table = compact
        module.zero_grad()
        torch.manual_seed(2)
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (compact_loss, compact_grads), (full_loss, full_grads) = results
    assert torch.allclose(compact_loss, full_loss, atol=1e-6)
    assert compact_grads.keys() == full_grads.keys() and "backbone.text_projection.weight" in compact_grads
    for name, grad in full_grads.items():
        assert torch.allclose(compact_grads[name], grad, atol=1e-6), name


def test_early_stopping_stops_patience_epochs_after_the_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(text_dim=0, max_epochs=40, patience=1, loss="sampled", n_negatives=8)
    _, history = train_sasrec(random_split(), config, None)

    scores = [epoch["val_ndcg@10"] for epoch in history["epochs"]]
    best_epoch = int(np.argmax(scores))
    assert len(scores) < 40
    assert len(scores) == best_epoch + 1 + config.patience
    assert list(tmp_path.iterdir()) == []  # no lightning_logs or checkpoints left behind


def test_max_time_is_respected():
    config = small_config(text_dim=0, max_epochs=10_000, patience=10_000)
    _, history = train_sasrec(cycle_split(n_users=60), config, None, max_time_s=1.0)
    assert len(history["epochs"]) < 10_000
    assert history["train_s"] < 4.0


def test_same_seed_gives_identical_models():
    split, config = cycle_split(n_users=40), small_config(max_epochs=2)
    first, first_history = train_sasrec(split, config, text_table())
    second, second_history = train_sasrec(split, config, text_table())
    histories = [np.array([3, 4, 5]), np.array([12])]
    assert torch.equal(first.score_histories(histories), second.score_histories(histories))
    assert [e["train_loss"] for e in first_history["epochs"]] == [
        e["train_loss"] for e in second_history["epochs"]
    ]


def test_training_windows_count_every_target_once():
    sequence = np.arange(101, 141)  # 40 items → 39 (input, next item) pairs
    items, types, targets = build_training_windows(
        [sequence, np.array([7, 8])], [np.full(40, 2), np.array([1, 3])], max_len=10
    )

    # Long sequence: windows end at pair 39, 34, ..., 9 (the last one starts at pair 0).
    assert items.shape == types.shape == targets.shape == (8, 10)
    counted = targets[targets > 0]
    assert sorted(counted.tolist()) == sorted(sequence[1:].tolist() + [8])
    for row_items, row_targets in zip(items[:7], targets[:7]):
        real = row_items[row_items > 0]
        assert np.all(np.diff(real) == 1)  # a contiguous slice of the sequence
        keep = row_targets > 0
        assert np.all(row_targets[keep] == row_items[keep] + 1)  # target = next item
    # Full windows count only their last half: every target there has >= 5 items of context.
    for row_items, row_targets in zip(items[:6], targets[:6]):
        assert np.all(row_items > 0)
        assert np.flatnonzero(row_targets).tolist() == [5, 6, 7, 8, 9]
    # Consecutive windows overlap by half.
    assert items[0, 0] - items[1, 0] == 5
    # Short sequence: one left-padded window with the input's event type.
    assert items[7, -2:].tolist() == [0, 7]
    assert types[7, -2:].tolist() == [0, 1]
    assert targets[7, -2:].tolist() == [0, 8]


def test_training_batches_are_built_from_the_sequences_in_the_order_of_a_shuffled_loader():
    """The data module builds each batch from the sequences when asked: the same windows, in
    the same shuffled order, as a loader over all windows materialised (what it replaced), and
    under DDP Lightning still reaches the DistributedSampler to reshuffle every epoch."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from rec_models.models.data_module import SequenceDataModule

    split = cycle_split(n_users=40)
    config = small_config(batch_size=16)
    module = SequenceDataModule(split, config)
    module.setup("fit")
    everything = TensorDataset(*(torch.from_numpy(a) for a in build_training_windows(
        split.train.items, split.train.event_types, config.max_len)))
    assert len(module.train_windows) == len(everything) > 16
    torch.manual_seed(7)
    built = list(module.train_dataloader())
    torch.manual_seed(7)
    materialised = list(DataLoader(everything, batch_size=16, shuffle=True))
    assert len(built) == len(materialised)
    for ours, theirs in zip(built, materialised):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

    class TwoRanks:
        world_size, global_rank = 2, 0
    module.trainer = TwoRanks()
    loader = module.train_dataloader()
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, DistributedSampler) and loader.batch_sampler.batch_size == 8
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3


def test_sampled_loss_ignores_accidental_hits():
    hidden = torch.randn(4, 8)
    item_reps = torch.randn(6, 8)
    targets = torch.tensor([2, 2, 2, 2])
    only_target = torch.zeros(6, dtype=torch.bool)
    only_target[2] = True  # every sampled negative equals the target → all ignored
    loss = sampled_softmax_loss(hidden, targets, item_reps, only_target, n_negatives=5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert set(LOSSES) == {"ce", "sampled"}


def test_config_round_trip_and_text_shape_checks():
    config = small_config(loss="sampled")
    assert SASRecConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="text_embeddings"):
        SASRecBackbone(config, torch.zeros(N_ITEMS, TEXT_DIM))
    with pytest.raises(ValueError, match="text_dim is 0"):
        SASRecBackbone(small_config(text_dim=0), text_table())
