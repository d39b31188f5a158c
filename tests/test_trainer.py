"""The training loop (dirio.optim.trainer) and its data (dirio.methods.training_data), on tiny 2D pairs.

Networks are tiny U-Nets (4 channels, 2 levels) on 24x24 Gaussian blobs; every run takes a few steps.
"""


import pytest
import torch
import torch.distributed as dist

from dirio.errors import DirioError
from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import DiceSupervision, RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.training_data import NO_AUGMENTATION, Augmentation, ImagePairSampler, TrainingImage
from dirio.optim.trainer import LAST, Batch, TrainConfig, epoch_generator, fit, resume_state
from dirio.transforms.network import NetworkTransform
from dirio.transforms.networks import UNet, build_network
from dirio.io.checkpoints import load_checkpoint
from spawn_helpers import free_port, spawn
from tiny_networks import blob_pair

TINY = dict(ndim=2, encoder_channels=(4, 4), decoder_channels=(4, 4), final_channels=(4,), init_std=1e-2)


class BlobSampler:
    """Blob pairs shifted by 1.5 +- 1 voxels, drawn from the trainer's generator."""

    def sample(self, generator, batch_size):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        fixed, moving = blob_pair(batch=batch_size, seed=seed, jitter=1.0)
        return Batch(fixed, moving)


def network(seed=0):
    torch.manual_seed(seed)
    return UNet(**TINY)


def terms(weight=0.1):
    return [Term("mse", Role.SIMILARITY, SimilarityTerm(make_similarity("mse")), 1.0),
            Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), weight)]


def mean_loss(transform, batch, objectives):
    from dirio.core.context import LevelContext
    from dirio.losses.terms import Evaluation

    shape = tuple(batch.fixed.shape[2:])
    ctx = LevelContext(0, shape, shape, batch.fixed, batch.moving)
    objectives[0].prepare(ctx)
    with torch.no_grad():
        evaluation = Evaluation(ctx, transform.field(ctx), transform)
        return float(objectives[0].function(evaluation, objectives[0].name))


def test_a_few_steps_lower_the_similarity_loss_on_held_out_pairs():
    torch.set_num_threads(1)
    transform = NetworkTransform(network())
    held_out = BlobSampler().sample(torch.Generator().manual_seed(999), 8)
    before = mean_loss(transform, held_out, terms())
    config = TrainConfig(epochs=2, steps_per_epoch=15, batch_size=4, lr=1e-2, amp="off")
    result = fit(transform, terms(), BlobSampler(), config)
    after = mean_loss(transform, held_out, terms())
    assert len(result.history) == 30 and [r["step"] for r in result.history] == list(range(30))
    assert after < 0.6 * before
    assert result.epochs[-1]["loss"] < result.epochs[0]["loss"]


def test_the_checkpoint_loads_weights_only_names_its_architecture_and_carries_the_training_state(tmp_path):
    transform = NetworkTransform(network())
    config = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=2, lr=1e-3, combine="pcgrad", amp="off")
    fit(transform, terms(), BlobSampler(), config, tmp_path, metadata={"data": "blobs"})
    raw = torch.load(tmp_path / LAST, weights_only=True)
    assert raw["format"] == "dirio-network" and raw["architecture"] == "unet"
    assert raw["settings"]["encoder_channels"] == [4, 4] or tuple(raw["settings"]["encoder_channels"]) == (4, 4)
    rebuilt = build_network(tmp_path / LAST)
    for name, value in transform.network.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    state = resume_state(load_checkpoint(tmp_path / LAST))
    assert state["epoch"] == 1 and state["config"]["combine"] == "pcgrad" and state["metadata"] == {"data": "blobs"}
    assert "rule" in state["rng"] and state["optimizer"]["state"]  # pcgrad's generator, Adam's moments
    assert (tmp_path / "history.csv").read_text().count("\n") == 5  # header + 4 steps
    assert (tmp_path / "checkpoint_best.pt").is_file()


def test_resuming_from_a_checkpoint_continues_with_the_same_losses_in_process(tmp_path):
    config = TrainConfig(epochs=3, steps_per_epoch=3, batch_size=2, lr=1e-2, combine="pcgrad", amp="off")
    whole = fit(NetworkTransform(network()), terms(), BlobSampler(), config, tmp_path / "a")
    short = TrainConfig(**{**config.to_dict(), "epochs": 1})
    fit(NetworkTransform(network()), terms(), BlobSampler(), short, tmp_path / "b")
    checkpoint = load_checkpoint(tmp_path / "b" / LAST)
    resumed_net = network(seed=123)  # other initial weights: the checkpoint's must replace them
    resumed_net.load_state_dict(checkpoint["state_dict"])
    resumed = fit(NetworkTransform(resumed_net), terms(), BlobSampler(), config, tmp_path / "b",
                  resume=resume_state(checkpoint))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]


def test_batches_depend_only_on_seed_and_epoch():
    images = [TrainingImage(f"i{k}", blob_pair(seed=k)[0][0], (blob_pair(seed=k)[0][0] > 0.5).long()) for k in range(3)]
    sampler = ImagePairSampler(images, "random", augmentation=Augmentation(elastic=1.0), supervision=True)
    a = sampler.sample(epoch_generator(7, 2), 3)
    b = sampler.sample(epoch_generator(7, 2), 3)
    c = sampler.sample(epoch_generator(7, 3), 3)
    assert torch.equal(a.fixed, b.fixed) and torch.equal(a.extra["moving_labels"], b.extra["moving_labels"])
    assert not torch.equal(a.fixed, c.fixed)
    assert a.extra["fixed_labels"].shape == (3, 1, 24, 24)


def test_without_augmentation_self_pairs_are_the_image_itself_and_labels_follow_the_warp():
    image = blob_pair(seed=1)[0][0]
    labels = (image > 0.5).long()
    item = TrainingImage("a", image, labels)
    same = ImagePairSampler([item], "self", augmentation=NO_AUGMENTATION, label_maps=True).sample(torch.Generator(), 1)
    assert torch.equal(same.fixed[0], image) and torch.equal(same.moving[0], image)
    spatial = Augmentation(rotation=20, scale=0, translation=0, intensity=0, gamma=0, noise=0)
    warped = ImagePairSampler([item], "self", augmentation=spatial, label_maps=True).sample(torch.Generator().manual_seed(3), 1)
    assert not torch.equal(warped.fixed[0], image)
    inside = warped.fixed[0][warped.extra["fixed_label_map"][0].bool()]
    assert inside.min() > 0.3  # the warped label covers the warped bright blob


def test_a_dice_supervised_term_trains(tmp_path):
    images = [TrainingImage(f"i{k}", blob_pair(seed=k, shift=2.0)[0][0], (blob_pair(seed=k, shift=2.0)[0][0] > 0.4).long())
              for k in range(3)]
    sampler = ImagePairSampler(images, "random", augmentation=NO_AUGMENTATION, supervision=True)
    objectives = terms() + [Term("dice", Role.SUPERVISION, DiceSupervision(), 1.0)]
    config = TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-3, combine="surgery", amp="off")
    result = fit(NetworkTransform(network()), objectives, sampler, config)
    assert 0 <= result.history[-1]["dice"] <= 1


def test_a_3d_network_trains_on_augmented_3d_pairs():
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"))
    images = [TrainingImage(f"v{k}", torch.exp(-((grid - 6 - k * 0.5) ** 2).sum(0) / 12)[None]) for k in range(2)]
    sampler = ImagePairSampler(images, "random", augmentation=Augmentation(elastic=0.5, elastic_spacing=4))
    net = UNet(**{**TINY, "ndim": 3})
    config = TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-3, amp="off")
    result = fit(NetworkTransform(net), terms(), sampler, config)
    assert len(result.history) == 2 and result.history[0]["mse"] > 0


def test_bf16_autocast_runs_on_the_cpu_when_asked_and_keeps_float32_weights():
    transform = NetworkTransform(network())
    config = TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-3, amp="bf16")
    result = fit(transform, terms(), BlobSampler(), config)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(p.dtype == torch.float32 for p in transform.parameters())


def test_a_batch_that_the_processes_cannot_share_equally_is_refused():
    with pytest.raises(DirioError, match="batch_size"):
        TrainConfig(batch_size=0).validate()


# --- several processes: the steps of one process with the whole batch ---------------------------

RULES = ("sum", "pcgrad", "surgery")
STEPS = 3


def _train_rule(rule, out):
    torch.set_num_threads(1)
    transform = NetworkTransform(network())
    config = TrainConfig(epochs=1, steps_per_epoch=STEPS, batch_size=4, lr=0.5, optimizer="sgd", combine=rule,
                         amp="off")
    fit(transform, terms(0.5), BlobSampler(), config, out)
    return {k: v.detach().clone() for k, v in transform.network.state_dict().items()}


def _worker(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = f"{path}/rank-out" if rank == 0 else None
        torch.save({rule: _train_rule(rule, out) for rule in RULES}, f"{path}/weights.{rank}")
        dist.barrier()  # leave together: neither rank tears down gloo while the other still talks
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_take_the_steps_of_one_process_with_the_whole_batch(tmp_path):
    # Each rank evaluates half of every batch; the rule averages each objective's gradient across
    # ranks before projecting. Tolerance 5e-5 on every weight after 3 SGD steps (float32 sums in
    # another order), while the steps move the weights by more than 1e-3.
    spawn(_worker, (2, free_port(), str(tmp_path)), 2, [str(tmp_path / f"weights.{r}") for r in range(2)])
    ranks = [torch.load(tmp_path / f"weights.{r}", weights_only=True) for r in range(2)]
    initial = network().state_dict()
    for rule in RULES:
        single = _train_rule(rule, None)
        assert max(float((single[k] - v).abs().max()) for k, v in initial.items()) > 1e-3, rule
        for name, value in single.items():
            assert torch.equal(ranks[0][rule][name], ranks[1][rule][name]), (rule, name)
            gap = float((ranks[0][rule][name] - value).abs().max())
            assert gap < 5e-5, (rule, name, gap)
    assert (tmp_path / "rank-out" / LAST).is_file()  # rank 0 wrote
