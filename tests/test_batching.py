from pathlib import Path

import numpy as np
import pytest
import torch

from lmsprint.data.batching import STRATEGIES, TokenStream, epoch_plan, padded_length, plan_stats
from lmsprint.data.curriculum import SeqLenSchedule
from lmsprint.data.loader import IGNORE_INDEX, Loader, eval_batches, segments
from lmsprint.data.shards import read_shard, write_shard

EOT = 0
PAD = 60000  # a pad id no fixture token takes, so padding is told apart from end-of-document tokens


@pytest.fixture
def stream(tmp_path: Path) -> TokenStream:
    """Two shards of documents of lengths 1..150 whose tokens encode their stream position (mod 60000)."""
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 150, size=80)
    shards, pos = [], 0
    for k, part in enumerate(np.array_split(lens, 2)):
        docs = []
        for n in part:
            ids = 1 + (np.arange(pos, pos + n) % 60000)
            ids[0] = EOT  # every document starts with the end-of-document token
            docs.append(ids)
            pos += n
        write_shard(tmp_path / f"s{k}.bin", docs, vocab_size=60001, eot_id=EOT)
        shards.append(read_shard(tmp_path / f"s{k}.bin"))
    return TokenStream(shards)


def _positions(stream: TokenStream, plan) -> np.ndarray:
    return np.concatenate([np.arange(s, s + n) for s, n in zip(plan.span_start, plan.span_len)])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_epoch_covers_every_token_once(stream: TokenStream, strategy: str) -> None:
    plan = epoch_plan(stream, strategy, 64, seed=1, epoch=0, batch_rows=4, bucket_window=2)
    pos = np.sort(_positions(stream, plan))
    assert np.array_equal(pos, np.arange(stream.n_tokens))  # no token lost, none repeated
    assert plan.row_lengths().max() <= 64


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loader_rows_inputs_and_targets(stream: TokenStream, strategy: str) -> None:
    """Over an epoch every stream token is an input once and a target once (except the very first)."""
    loader = Loader(stream, strategy=strategy, seq_len=64, batch_rows=4, micro_rows=2, seed=3,
                    doc_mask=strategy in ("pack", "best-fit"))
    plan_rows = epoch_plan(stream, strategy, 64, seed=3, epoch=0, batch_rows=4).n_rows
    steps = -(-plan_rows // 4)
    inputs, targets = [], []
    for step in range(steps):
        batch = loader.next(step)
        for mb in batch.micro:
            width = 64 if strategy in ("pack", "best-fit") else mb.inputs.shape[1]
            assert mb.inputs.shape == (2, width) and (width % 64 == 0 or width == 64)
            keep = mb.targets != IGNORE_INDEX
            inputs.append(mb.inputs[keep].numpy())
            targets.append(mb.targets[keep].numpy())
    # position p carries token 1 + p % 60000 unless p starts a document; check via the stream
    all_tokens = stream.read(0, stream.n_tokens)
    flat_t = np.concatenate(targets)[: stream.n_tokens - 1]
    assert np.array_equal(np.sort(flat_t), np.sort(all_tokens[1:]))


def test_pad_rows_pad_to_multiple_and_ignore_padding(stream: TokenStream) -> None:
    loader = Loader(stream, strategy="pad", seq_len=128, batch_rows=8, micro_rows=4, seed=0, pad_multiple=32)
    for step in range(5):
        for mb in loader.next(step).micro:
            width = mb.inputs.shape[1]
            assert width % 32 == 0 and width <= 128
            pad = mb.targets == IGNORE_INDEX
            # padding sits at the end of each row; its inputs are the pad id
            assert torch.all(mb.inputs[pad & (torch.arange(width) > 0)] == EOT) or pad.sum() == 0


def test_bucket_pads_less_than_pad(stream: TokenStream) -> None:
    stats = {s: plan_stats(epoch_plan(stream, s, 128, seed=0, epoch=0, batch_rows=8, bucket_window=4), strategy=s,
                           seq_len=128, micro_rows=8, pad_multiple=16) for s in ("pad", "bucket", "pack", "best-fit")}
    assert stats["bucket"]["waste"] < stats["pad"]["waste"]
    assert stats["pack"]["waste"] < 0.01
    assert stats["best-fit"]["rows"] < stats["pad"]["rows"]


def test_best_fit_never_splits_a_document_that_fits(stream: TokenStream) -> None:
    plan = epoch_plan(stream, "best-fit", 160, seed=0, epoch=0)
    lens = dict(zip(stream.doc_starts.tolist(), stream.doc_lens.tolist()))
    for s, n in zip(plan.span_start, plan.span_len):
        if s in lens and lens[s] <= 160:
            assert n == lens[s]


@pytest.mark.parametrize("strategy", ["pack", "best-fit"])
def test_document_masks_and_positions_restart(stream: TokenStream, strategy: str) -> None:
    loader = Loader(stream, strategy=strategy, seq_len=64, batch_rows=2, micro_rows=2, seed=0, doc_mask=True,
                    pad_id=PAD)
    mb = loader.next(0).micro[0]
    for row in range(2):
        inputs, seg, pos = mb.inputs[row], mb.doc_ids[row], mb.pos[row]
        starts = torch.nonzero(inputs == EOT).flatten().tolist()
        for s in starts:
            assert pos[s] == 0  # a document start restarts positions
            if s > 0:
                assert seg[s] != seg[s - 1]  # and begins a new attention segment
        assert pos[0] == 0


@pytest.mark.parametrize("strategy", ["pack", "best-fit"])
def test_segments_never_span_two_documents(stream: TokenStream, strategy: str) -> None:
    """Inside a segment the tokens are consecutive stream positions with no document start: this also covers the
    rows a best-fit remainder starts mid-document (no end-of-document token to restart at)."""
    loader = Loader(stream, strategy=strategy, seq_len=64, batch_rows=8, micro_rows=4, seed=0, doc_mask=True,
                    pad_id=PAD)
    for step in range(20):
        for mb in loader.next(step).micro:
            x, seg, pos = mb.inputs, mb.doc_ids, mb.pos
            same = (seg[:, 1:] == seg[:, :-1]) & (x[:, 1:] != PAD)
            assert not (same & (x[:, 1:] == EOT)).any()  # a document start always opens a new segment
            nxt = same & (x[:, :-1] != EOT)
            assert torch.equal(x[:, 1:][nxt], x[:, :-1][nxt] + 1)  # a segment never jumps in the stream
            assert torch.equal(pos[:, 1:][same], pos[:, :-1][same] + 1)  # positions count up inside it
            assert (pos[:, 1:][~same & (x[:, 1:] != PAD)] == 0).all()  # and restart at each new one


def test_segments_helper() -> None:
    doc = np.array([[5, 5, 5, 6, 6, 6, 6, 6]])
    seg, pos = segments(doc, doc.shape, np.array([4]))
    assert seg.tolist() == [[1, 1, 1, 2, 3, 3, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]


def test_curriculum_lengths() -> None:
    lin = SeqLenSchedule("linear", 1024, 128, total_steps=100, warmup=0.5, multiple=128)
    assert [lin.length_at(s) for s in (0, 25, 49, 50, 99)] == [128, 512, 1024 - 128, 1024, 1024]
    stages = SeqLenSchedule("stages", 1024, 128, total_steps=90, warmup=1 / 3)
    assert [stages.length_at(s) for s in (0, 9, 10, 20, 29, 30)] == [128, 128, 256, 512, 512, 1024]
    tokens = SeqLenSchedule("tokens", 1024, 256, total_steps=100, milestones=(1000, 3000), tokens_per_step=500)
    assert [tokens.length_at(s) for s in (0, 1, 2, 5, 6, 50)] == [256, 256, 512, 512, 1024, 1024]


@pytest.mark.parametrize(("seq_len", "start", "lengths"), [(192, 64, [64, 128, 192]), (320, 64, [64, 128, 256, 320]),
                                                          (256, 256, [256])])
def test_stages_end_at_seq_len_when_it_is_not_a_power_of_two_times_start(seq_len: int, start: int,
                                                                          lengths: list[int]) -> None:
    sched = SeqLenSchedule("stages", seq_len, start, total_steps=100, warmup=0.5)
    assert sorted({sched.length_at(s) for s in range(100)}) == lengths  # never beyond seq_len, ends there
    assert sched.length_at(50) == seq_len


def test_loader_curriculum_keeps_tokens_per_step(stream: TokenStream) -> None:
    sched = SeqLenSchedule("stages", 64, 16, total_steps=8, warmup=0.5)
    loader = Loader(stream, strategy="pack", seq_len=64, batch_rows=4, micro_rows=2, seed=0, curriculum=sched)
    seen = []
    for step in range(8):
        batch = loader.next(step)
        shapes = {tuple(mb.inputs.shape) for mb in batch.micro}
        assert shapes == {(2, 64)}  # shapes never change: nothing recompiles
        seen.append((batch.seq_len, batch.sequences))
        mb = batch.micro[0]
        assert int(mb.pos.max()) == batch.seq_len - 1
    assert seen == [(16, 16), (16, 16), (32, 8), (32, 8), (64, 4), (64, 4), (64, 4), (64, 4)]


def test_short_mix_after_curriculum(stream: TokenStream) -> None:
    sched = SeqLenSchedule("stages", 64, 16, total_steps=2, warmup=0.5, short_mix=0.5)
    loader = Loader(stream, strategy="pack", seq_len=64, batch_rows=32, micro_rows=32, seed=0, curriculum=sched)
    batch = loader.next(5)
    longest = batch.micro[0].pos.max(dim=1).values
    assert set(longest.tolist()) == {15, 63}
    assert 4 < int((longest == 15).sum()) < 28


@pytest.mark.parametrize("strategy", [*STRATEGIES, "random"])
def test_loader_resume_is_exact(stream: TokenStream, strategy: str) -> None:
    def make() -> Loader:
        return Loader(stream, strategy=strategy, seq_len=64, batch_rows=4, micro_rows=4, seed=5)

    for save in (7, 40):  # in the first epoch, and in the second (whose steps start mid-epoch for bucket)
        a = make()
        for step in range(save):
            a.next(step)
        state = a.state_dict()
        b = make()
        b.load_state_dict(state)
        for step in range(save, save + 40):  # crosses epoch boundaries
            x, y = a.next(step), b.next(step)
            assert torch.equal(x.micro[0].inputs, y.micro[0].inputs) and x.n_targets == y.n_targets


def test_ranks_get_disjoint_rows_and_the_same_counts(stream: TokenStream) -> None:
    ranks = [Loader(stream, strategy="pack", seq_len=64, batch_rows=8, micro_rows=2, rank=r, world=2, seed=0)
             for r in range(2)]
    single = Loader(stream, strategy="pack", seq_len=64, batch_rows=8, micro_rows=4, seed=0)
    for step in range(3):
        b0, b1, s = ranks[0].next(step), ranks[1].next(step), single.next(step)
        assert b0.n_targets == b1.n_targets == s.n_targets
        rows0 = {tuple(r.tolist()) for mb in b0.micro for r in mb.inputs}
        rows1 = {tuple(r.tolist()) for mb in b1.micro for r in mb.inputs}
        assert not rows0 & rows1
        assert rows0 | rows1 == {tuple(r.tolist()) for mb in s.micro for r in mb.inputs}


@pytest.mark.parametrize("strategy", ["pad", "bucket"])
def test_ranks_take_micro_batches_in_snake_order_and_count_every_ranks_slots(stream: TokenStream,
                                                                             strategy: str) -> None:
    """Bucket steps are sorted longest first: micro-batches are dealt 0, 1, 1, 0 (not rank 0 the first half) so
    no rank always gets the longest rows; n_slots is the padded size of the whole step over all ranks."""
    kw = dict(strategy=strategy, seq_len=128, batch_rows=8, seed=0, pad_multiple=16, pad_id=PAD, bucket_window=2)
    ranks = [Loader(stream, micro_rows=2, rank=r, world=2, **kw) for r in range(2)]
    single = Loader(stream, micro_rows=2, **kw)
    for step in range(6):
        b0, b1, s = ranks[0].next(step), ranks[1].next(step), single.next(step)
        rows = [[tuple(r.tolist()) for r in mb.inputs] for mb in s.micro]
        assert [[tuple(r.tolist()) for r in mb.inputs] for mb in b0.micro] == [rows[0], rows[3]]
        assert [[tuple(r.tolist()) for r in mb.inputs] for mb in b1.micro] == [rows[1], rows[2]]
        slots = sum(mb.inputs.numel() for b in (b0, b1) for mb in b.micro)
        assert b0.n_slots == b1.n_slots == s.n_slots == slots


def test_eval_batches_are_fixed_and_shaped_like_training(stream: TokenStream) -> None:
    a = eval_batches(stream, seq_len=64, micro_rows=4, max_tokens=300)
    b = eval_batches(stream, seq_len=64, micro_rows=4, max_tokens=300)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b))
    assert all(mb.inputs.shape == (4, 64) for mb in a)
    assert sum(int((mb.targets != IGNORE_INDEX).sum()) for mb in a) == 299


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world", [1, 2])
def test_every_rank_gets_disjoint_rows_and_each_token_once_per_epoch(stream: TokenStream, strategy: str,
                                                                     world: int) -> None:
    """Over whole epochs, all ranks together see every stream token once per epoch as an input, each real input
    has its next stream token as target, and rows have the configured width."""
    rows = epoch_plan(stream, strategy, 64, seed=3, epoch=0, batch_rows=8).n_rows
    steps = int(np.lcm(rows, 8)) // 8  # a whole number of epochs
    epochs = steps * 8 // rows
    loaders = [Loader(stream, strategy=strategy, seq_len=64, batch_rows=8, micro_rows=2, rank=r, world=world, seed=3,
                      doc_mask=strategy in ("pack", "best-fit"), pad_multiple=16, pad_id=PAD) for r in range(world)]
    tokens = stream.read(0, stream.n_tokens)
    seen = []
    for step in range(steps):
        batches = [loader.next(step) for loader in loaders]
        assert len({(b.n_targets, b.n_tokens) for b in batches}) == 1  # every rank agrees on the step's counts
        n_targets = 0
        for mb in (mb for b in batches for mb in b.micro):
            real = mb.inputs != PAD
            width = 64
            if strategy in ("pad", "bucket"):  # padded to the micro-batch's longest row, rounded up
                width = padded_length(int(real.sum(1).max()), multiple=16, seq_len=64)
            assert mb.inputs.shape == (2, width)
            keep = mb.targets != IGNORE_INDEX
            assert not (keep & ~real).any()  # padding is never a target
            x, t = mb.inputs[keep & (mb.inputs != EOT)], mb.targets[keep & (mb.inputs != EOT)]
            assert torch.equal(t, torch.from_numpy(tokens[x.numpy()]))  # input at position p = x - 1 predicts p + 1
            seen.append(mb.inputs[real].numpy())
            n_targets += int(keep.sum())
        assert n_targets == batches[0].n_targets
    seen_all = np.concatenate(seen)
    expected = np.full(stream.n_tokens + 1, epochs)  # token 1 + p at position p, but EOT at document starts
    expected[0], expected[stream.doc_starts + 1] = 0, 0
    counts = np.bincount(seen_all[seen_all != EOT], minlength=stream.n_tokens + 1)
    assert np.array_equal(counts, expected)  # no token lost or repeated, across ranks
    assert int((seen_all == EOT).sum()) == epochs * len(stream.doc_starts)


def test_bucket_batches_stay_aligned_with_steps_across_epochs(stream: TokenStream) -> None:
    """An epoch whose rows do not fill whole steps must not shift the next epoch's buckets across steps: each
    step inside an epoch is one bucket (rows longest first), not the tail of one and the head of another."""
    loader = Loader(stream, strategy="bucket", seq_len=64, batch_rows=8, micro_rows=8, seed=0, bucket_window=64,
                    pad_id=PAD)
    assert epoch_plan(stream, "bucket", 64, seed=0, epoch=0, batch_rows=8).n_rows % 8 != 0
    checked = 0
    for step in range(60):  # three epochs
        epoch = loader.epoch
        lens = (loader.next(step).micro[0].inputs != PAD).sum(1)
        if loader.epoch == epoch or loader.pos == 0:  # the step lies inside one epoch
            assert torch.all(lens[:-1] >= lens[1:]), (step, lens.tolist())
            checked += 1
    assert checked > 50


@pytest.mark.parametrize("strategy", ["pack", "best-fit"])
def test_resume_mid_curriculum_is_exact(stream: TokenStream, strategy: str) -> None:
    """Resuming mid-schedule and after it (with short_mix) gives the same batches: tokens, targets, masks and
    positions, sequence lengths and counts."""
    sched = SeqLenSchedule("stages", 64, 16, total_steps=20, warmup=0.5, short_mix=0.3)

    def make(seed: int = 5) -> Loader:
        return Loader(stream, strategy=strategy, seq_len=64, batch_rows=12, micro_rows=4, seed=seed, doc_mask=True,
                      curriculum=sched)

    ref = make()
    expected = [ref.next(step) for step in range(30)]
    assert [expected[s].seq_len for s in (0, 4, 9, 10, 29)] == [16, 16, 32, 64, 64]
    for save in (4, 7, 25):
        a = make()
        for step in range(save):
            a.next(step)
        b = make()
        b.load_state_dict(a.state_dict())
        for step in range(save, 30):
            x, y = expected[step], b.next(step)
            assert (x.n_targets, x.n_tokens, x.seq_len, x.sequences) == (y.n_targets, y.n_tokens, y.seq_len,
                                                                         y.sequences)
            for u, v in zip(x.micro, y.micro):
                for t1, t2 in ((u.inputs, v.inputs), (u.targets, v.targets), (u.pos, v.pos), (u.doc_ids, v.doc_ids)):
                    assert t1 is not None and t2 is not None and torch.equal(t1, t2)
    other = make(seed=6).next(0).micro[0].inputs
    assert not torch.equal(other, expected[0].micro[0].inputs)  # the seed sets the shuffle


def test_random_rows_are_nanogpt_windows(stream: TokenStream) -> None:
    """random: each row is stream[i:i+T] with targets stream[i+1:i+T+1], i uniform in [0, n - T) (nanoGPT's
    get_batch), as many rows per epoch as pack, a new draw every epoch, the same draw for the same seed."""
    T = 64
    plan = epoch_plan(stream, "random", T, seed=1, epoch=0)
    assert plan.n_rows == epoch_plan(stream, "pack", T, seed=1, epoch=0).n_rows
    assert (plan.span_len == T).all() and plan.span_start.min() >= 0
    assert plan.span_start.max() < stream.n_tokens - T
    again = epoch_plan(stream, "random", T, seed=1, epoch=0)
    assert np.array_equal(plan.span_start, again.span_start)
    assert not np.array_equal(plan.span_start, epoch_plan(stream, "random", T, seed=1, epoch=1).span_start)
    loader = Loader(stream, strategy="random", seq_len=T, batch_rows=4, micro_rows=4, seed=1)
    batch = loader.next(0)
    assert batch.n_targets == batch.n_tokens == 4 * T  # every window has all its targets
    for row, start in zip(batch.micro[0].inputs, plan.span_start[:4]):
        assert torch.equal(row, torch.from_numpy(stream.read(int(start), T)))
    targets = batch.micro[0].targets
    assert torch.equal(targets[0], torch.from_numpy(stream.read(int(plan.span_start[0]) + 1, T)))
    # over many epochs the starts cover the whole allowed range, the last allowed start included
    starts = np.concatenate([epoch_plan(stream, "random", T, seed=2, epoch=e).span_start for e in range(200)])
    assert starts.min() == 0 and starts.max() == stream.n_tokens - T - 1


def test_random_rows_need_a_window(tmp_path: Path) -> None:
    from lmsprint.errors import DataError

    write_shard(tmp_path / "tiny.bin", [np.arange(1, 50)], vocab_size=100, eot_id=0)
    with pytest.raises(DataError, match="batching=random"):
        epoch_plan(TokenStream([read_shard(tmp_path / "tiny.bin")]), "random", 64, seed=0, epoch=0)
