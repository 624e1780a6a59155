import os
import socket

import open_clip
from open_clip.loss import SigLipLoss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import clipkit
from clipkit.itm import (build_itm_head, encode_image_tokens, encode_text_tokens, itm_logits_and_labels,
                         padding_mask, sample_hard_negatives)
from clipkit.losses import info_nce, itm_loss, sigmoid_loss


def features(batch=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    return image, text


def test_info_nce_equals_open_clip_cliploss_value_and_gradients():
    image, text = features()
    scale = torch.tensor(14.3)
    ours = info_nce(image, text, scale)
    ours.backward()
    ours_grads = image.grad.clone(), text.grad.clone()
    image2, text2 = features()
    theirs = open_clip.ClipLoss()(image2, text2, scale)
    theirs.backward()
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours_grads[0], image2.grad, atol=1e-6) and torch.allclose(ours_grads[1], text2.grad, atol=1e-6)


def test_info_nce_multi_positive_against_hand_computation():
    image, text = features(batch=4)
    ids = torch.tensor([7, 7, 3, 5])  # samples 0 and 1: two captions of one image
    scale = 10.0
    loss = info_nce(image, text, scale, image_ids=ids)
    logits = scale * image @ text.T
    log_p_img, log_p_txt = F.log_softmax(logits, dim=1), F.log_softmax(logits.T, dim=1)
    expected_rows = []
    for log_p in (log_p_img, log_p_txt):
        rows = [-(log_p[0, 0] + log_p[0, 1]) / 2, -(log_p[1, 0] + log_p[1, 1]) / 2, -log_p[2, 2], -log_p[3, 3]]
        expected_rows.append(torch.stack(rows).mean())
    assert torch.allclose(loss, (expected_rows[0] + expected_rows[1]) / 2, atol=1e-6)
    assert not torch.allclose(loss, info_nce(image, text, scale), atol=1e-4)  # differs from diagonal targets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, image, text, ids, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = image.shape[0] // world
        mine = slice(rank * batch, (rank + 1) * batch)
        local_image = image[mine].clone().requires_grad_()
        local_text = text[mine].clone().requires_grad_()
        loss = info_nce(local_image, local_text, torch.tensor(12.0), image_ids=ids[mine])
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out[rank] = {"loss": mean / world, "image_grad": local_image.grad / world, "text_grad": local_text.grad / world}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("with_repeats", [False, True])
def test_two_process_loss_equals_single_process_loss(with_repeats):
    image, text = features(batch=8, seed=3)
    image, text = image.detach(), text.detach()
    ids = torch.tensor([0, 1, 2, 1, 4, 5, 0, 7]) if with_repeats else torch.arange(8)  # repeats across ranks
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), image, text, ids, out), nprocs=2, join=True)
    whole_image, whole_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    whole = info_nce(whole_image, whole_text, torch.tensor(12.0), image_ids=ids)
    whole.backward()
    assert torch.allclose(out[0]["loss"], whole, atol=1e-6) and torch.allclose(out[1]["loss"], whole, atol=1e-6)
    # DDP averages gradients over ranks: each rank's share equals the single-process gradient of its slice
    got_image = torch.cat([out[0]["image_grad"], out[1]["image_grad"]])
    got_text = torch.cat([out[0]["text_grad"], out[1]["text_grad"]])
    # gradients reaching a rank's slice through the other rank's gathered copy are summed by all_gather's backward
    assert torch.allclose(got_image, whole_image.grad, atol=1e-6)
    assert torch.allclose(got_text, whole_text.grad, atol=1e-6)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="both be"):
        info_nce(torch.zeros(4, 8), torch.zeros(3, 8), 1.0)


# -- hard negatives ----------------------------------------------------------------------------------


def test_sampler_never_picks_a_same_image_negative():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    sim = torch.randn(8, 8)
    sim[ids[:, None] == ids[None, :]] = 50.0  # positives look far more similar than anything else
    for _ in range(200):
        neg_img, text_has, neg_txt, image_has = sample_hard_negatives(sim, ids)
        assert text_has.all() and image_has.all()
        assert (ids[neg_img] != ids).all() and (ids[neg_txt] != ids).all()


def test_sampler_prefers_hard_negatives():
    ids = torch.arange(4)
    sim = torch.full((4, 4), -5.0)
    sim.fill_diagonal_(10.0)
    sim[0, 2] = sim[2, 0] = 9.0  # image 0 and caption 2 (and vice versa) are confusable
    generator = torch.Generator().manual_seed(1)
    picks = [int(sample_hard_negatives(sim, ids, generator)[2][0]) for _ in range(100)]
    assert picks.count(2) > 95


def test_sampler_is_safe_with_one_image_fp16_and_tiny_batches():
    same = torch.zeros(5, dtype=torch.long)  # every sample shows the same image: no valid negative anywhere
    neg_img, text_has, neg_txt, image_has = sample_hard_negatives(torch.randn(5, 5), same)
    assert not text_has.any() and not image_has.any()
    half = (torch.randn(6, 6) * 1e4).half()  # fp16 extremes: softmax underflows to 0 for every negative
    half.fill_diagonal_(float("inf"))
    half[0, 1] = float("nan")
    neg_img, text_has, neg_txt, image_has = sample_hard_negatives(half, torch.arange(6))
    assert text_has.all() and (neg_img != torch.arange(6)).all() and (neg_txt != torch.arange(6)).all()
    pair = sample_hard_negatives(torch.randn(2, 2).bfloat16(), torch.tensor([0, 1]))
    assert pair[0].tolist() == [1, 0] and pair[2].tolist() == [1, 0]


def test_itm_batch_has_positives_and_both_kinds_of_negatives():
    model = clipkit.load_model("clipkit-tiny", device="cpu")
    clip = model.clip
    texts = ["a red circle", "a blue square", "a green star", "a red circle again"]
    tokens = model.tokenize(texts)
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.tensor([0, 1, 2, 0])
    image_emb, image_states = encode_image_tokens(clip, pixels)
    text_emb, text_states = encode_text_tokens(clip, tokens)
    similarity = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    head = build_itm_head(clip, width=32, layers=1, heads=2)
    logits, labels = itm_logits_and_labels(head, text_states, padding_mask(tokens), image_states, similarity, ids)
    assert logits.shape == (12, 2) and labels.tolist() == [1] * 4 + [0] * 8
    loss, accuracy = itm_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= accuracy <= 1
    assert head.classifier.weight.grad is not None and clip.visual.conv1.weight.grad is not None


def test_itm_needs_an_image_tower_with_token_states():
    with pytest.raises(ValueError, match="needs an image tower that yields token states.*--no-itm"):
        build_itm_head(clipkit.load_model("clipkit-tiny-rn", device="cpu").clip)


def test_a_resnet_tower_trains_without_itm_with_clip_s_loss():
    """Without an ITM head the towers give their embeddings alone, so a ResNet tower (no token states)
    trains; the loss is open_clip's ClipLoss on encode_image / encode_text (it raised AttributeError)."""
    from clipkit.train import Trainable

    model = clipkit.load_model("clipkit-tiny-rn", device="cpu")
    pixels = torch.randn(6, 3, model.image_size, model.image_size)
    tokens = model.tokenizer([f"caption {i}" for i in range(6)])
    out = Trainable(model.clip, None)(pixels, tokens, torch.arange(6))
    image = torch.nn.functional.normalize(model.clip.encode_image(pixels), dim=-1)
    text = torch.nn.functional.normalize(model.clip.encode_text(tokens), dim=-1)
    expected = open_clip.ClipLoss()(image, text, model.clip.logit_scale.exp())
    torch.testing.assert_close(out["itc"], expected, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert model.clip.visual.conv1.weight.grad is not None


def test_uniform_mix_brings_in_easy_negatives_but_never_same_image_ones():
    ids = torch.tensor([0, 1, 2, 3, 3])
    sim = torch.full((5, 5), -50.0)
    sim.fill_diagonal_(50.0)
    sim[0, 1] = sim[1, 0] = 49.0  # the only hard negative of image 0 / caption 0
    generator = torch.Generator().manual_seed(0)
    pure = [int(sample_hard_negatives(sim, ids, generator)[2][0]) for _ in range(200)]
    mixed = [sample_hard_negatives(sim, ids, generator, uniform_mix=0.5) for _ in range(400)]
    picks = [int(m[2][0]) for m in mixed]
    assert set(pure) == {1}
    assert 0.6 < picks.count(1) / len(picks) < 0.75  # 0.5 hard + 0.5 x 1/4 uniform
    assert all((ids[m[0]] != ids).all() and (ids[m[2]] != ids).all() for m in mixed)


# ---------------------------------------------------------------------------------------------
# The sigmoid loss (SigLIP) against open_clip's SigLipLoss


def _siglip_inputs():
    scale = torch.tensor(10.0).log().requires_grad_()
    bias = torch.tensor(-10.0).requires_grad_()
    return scale, bias


def test_sigmoid_loss_equals_open_clip_siglip_loss_value_and_gradients():
    image, text = features(seed=5)
    scale, bias = _siglip_inputs()
    ours = sigmoid_loss(image, text, scale.exp(), bias)
    ours.backward()
    ours_grads = [image.grad.clone(), text.grad.clone(), scale.grad.clone(), bias.grad.clone()]
    image2, text2 = features(seed=5)
    scale2, bias2 = _siglip_inputs()
    theirs = SigLipLoss()(image2, text2, scale2.exp(), bias2)
    theirs.backward()
    assert torch.allclose(ours, theirs, atol=1e-5)
    for mine, reference in zip(ours_grads, [image2.grad, text2.grad, scale2.grad, bias2.grad]):
        assert torch.allclose(mine, reference, atol=1e-5)


def test_sigmoid_loss_multi_positive_against_hand_computation():
    image, text = features(batch=4, seed=2)
    ids = torch.tensor([7, 7, 3, 5])
    loss = sigmoid_loss(image, text, 10.0, -3.0, image_ids=ids)
    logits = 10.0 * image @ text.T - 3.0
    labels = -torch.ones(4, 4)
    labels[0, 0] = labels[0, 1] = labels[1, 0] = labels[1, 1] = labels[2, 2] = labels[3, 3] = 1
    assert torch.allclose(loss, -F.logsigmoid(labels * logits).sum() / 4, atol=1e-6)


def _siglip_worker(rank, world, port, image, text, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = image.shape[0] // world
        mine = slice(rank * batch, (rank + 1) * batch)
        results = {}
        for name in ("ours", "open_clip"):
            local_image, local_text = image[mine].clone().requires_grad_(), text[mine].clone().requires_grad_()
            scale, bias = _siglip_inputs()
            if name == "ours":
                loss = sigmoid_loss(local_image, local_text, scale.exp(), bias)
            else:
                loss = SigLipLoss(rank=rank, world_size=world)(local_image, local_text, scale.exp(), bias)
            loss.backward()
            results[name] = {"loss": loss.detach(), "grads": [local_image.grad, local_text.grad, scale.grad, bias.grad]}
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_two_process_sigmoid_loss_equals_open_clip_and_single_process():
    image, text = features(batch=8, seed=4)
    image, text = image.detach(), text.detach()
    out = mp.Manager().dict()
    mp.spawn(_siglip_worker, args=(2, _free_port(), image, text, out), nprocs=2, join=True)
    for rank in range(2):
        ours, theirs = out[rank]["ours"], out[rank]["open_clip"]
        assert torch.allclose(ours["loss"], theirs["loss"], atol=1e-5)
        for mine, reference in zip(ours["grads"], theirs["grads"]):
            assert torch.allclose(mine, reference, atol=1e-5)
    whole_image, whole_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale, bias = _siglip_inputs()
    whole = sigmoid_loss(whole_image, whole_text, scale.exp(), bias)
    whole.backward()
    assert torch.allclose((out[0]["ours"]["loss"] + out[1]["ours"]["loss"]) / 2, whole, atol=1e-5)
    averaged = torch.cat([out[0]["ours"]["grads"][0], out[1]["ours"]["grads"][0]]) / 2  # DDP averages over ranks
    assert torch.allclose(averaged, whole_image.grad, atol=1e-5)
