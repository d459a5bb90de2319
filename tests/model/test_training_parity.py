"""Training losses and gradients against upstream Kronos (tests/fixtures/kronos-training-tiny).

The fixture holds upstream's loss terms and gradient norms for one fixed batch on the parity
checkpoints in eval mode: losses must agree within 1e-5 relative, gradient norms within 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_package.kronos import Kronos, load_model, load_tokenizer
from model_package.kronos.training import predictor_loss, tokenizer_loss

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def expected(training_dir: Path) -> dict:
    return json.loads((training_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def batch(training_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(training_dir / "batch.npz")
    return torch.from_numpy(data["x"]).float(), torch.from_numpy(data["stamp"]).float()


def grad_norms(net: torch.nn.Module) -> tuple[float, dict[str, float]]:
    """(global L2 norm over every parameter's gradient, per-parameter norms)."""
    per = {n: float(p.grad.double().norm()) for n, p in net.named_parameters() if p.grad is not None}
    return float(np.sqrt(sum(v * v for v in per.values()))), per


def assert_close(actual: float, wanted: float, rtol: float, what: str) -> None:
    assert abs(actual - wanted) <= rtol * abs(wanted), f"{what}: {actual!r} vs upstream {wanted!r} (rtol {rtol})"


def assert_matches_upstream(net: torch.nn.Module, terms: dict[str, torch.Tensor], wanted: dict, what: str) -> None:
    """Every loss term (1e-5), then after backward the global and the named gradient norms (1e-4)."""
    for key in terms:
        assert_close(float(terms[key].detach()), wanted[key], LOSS_RTOL, f"{what} {key}")
    terms["loss"].backward()
    total, per = grad_norms(net)
    assert_close(total, wanted["grad_norm_total"], GRAD_RTOL, f"{what} grad norm")
    for name, norm in wanted["grad_norm"].items():
        assert_close(per[name], norm, GRAD_RTOL, f"{what} grad {name}")


def test_tokenizer_loss_and_gradients_match_upstream(parity_dir: Path, expected: dict, batch: tuple) -> None:
    tokenizer = load_tokenizer(parity_dir / "tokenizer")
    assert not tokenizer.training
    x, _ = batch
    terms = tokenizer_loss(tokenizer, x)
    assert set(terms) == {"loss", "recon_pre", "recon_all", "bsq_loss"}
    assert_matches_upstream(tokenizer, terms, expected["tokenizer"], "tokenizer")


def test_encoded_tokens_match_upstream(parity_dir: Path, expected: dict, batch: tuple) -> None:
    tokenizer = load_tokenizer(parity_dir / "tokenizer")
    with torch.no_grad():
        s1, s2 = tokenizer.encode(batch[0])
    assert s1.tolist() == expected["tokens"]["s1"]
    assert s2.tolist() == expected["tokens"]["s2"]


def test_predictor_loss_and_gradients_match_upstream(parity_dir: Path, expected: dict, batch: tuple) -> None:
    model = load_model(parity_dir / "model")
    assert not model.training
    s1 = torch.tensor(expected["tokens"]["s1"])
    s2 = torch.tensor(expected["tokens"]["s2"])
    terms = predictor_loss(model, s1, s2, batch[1], teacher_forcing=True)
    assert set(terms) == {"loss", "ce_s1", "ce_s2"}
    assert_matches_upstream(model, terms, expected["predictor"], "predictor")


def test_predictor_without_teacher_forcing_samples_the_s2_condition(
    parity_dir: Path, expected: dict, batch: tuple
) -> None:
    """Upstream's script: s2 conditioned on sampled s1 ids. Same seed, same loss; the s1 term
    does not depend on the sample, the s2 term does; gradients reach the whole network."""
    model = load_model(parity_dir / "model")
    s1 = torch.tensor(expected["tokens"]["s1"])
    s2 = torch.tensor(expected["tokens"]["s2"])

    def run(seed: int) -> dict[str, torch.Tensor]:
        return predictor_loss(
            model, s1, s2, batch[1], teacher_forcing=False, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first["loss"], again["loss"])
    assert_close(
        float(first["ce_s1"].detach()), expected["predictor"]["ce_s1"], LOSS_RTOL, "ce_s1 without teacher forcing"
    )
    assert float(first["ce_s2"]) != float(other["ce_s2"])
    assert torch.isfinite(first["loss"])
    first["loss"].backward()
    assert model.dep_layer.cross_attn.q_proj.weight.grad is not None
    assert float(model.embedding.emb_s1.weight.grad.norm()) > 0


def test_training_mode_is_causal_and_uses_dropout(parity_dir: Path, expected: dict, batch: tuple) -> None:
    """Training mode: dropout with the config's probabilities (seeded by the global RNG), and
    the s2 head attends causally (upstream: is_causal = self.training); eval mode afterwards
    gives the fixture again."""
    model = load_model(parity_dir / "model")
    s1 = torch.tensor(expected["tokens"]["s1"])
    s2 = torch.tensor(expected["tokens"]["s2"])
    assert model.config.token_dropout_p > 0 and model.config.resid_dropout_p > 0
    model.train()

    def seeded_loss(seed: int) -> float:
        torch.manual_seed(seed)
        return float(predictor_loss(model, s1, s2, batch[1])["loss"].detach())

    assert seeded_loss(0) == seeded_loss(0)
    assert seeded_loss(0) != seeded_loss(1)
    model.eval()
    evaluated = float(predictor_loss(model, s1, s2, batch[1])["loss"].detach())
    assert_close(evaluated, expected["predictor"]["loss"], LOSS_RTOL, "eval loss after train()")

    no_dropout = Kronos(
        dataclasses.replace(
            model.config, ffn_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, token_dropout_p=0.0
        )
    )
    no_dropout.load_state_dict(model.state_dict())
    inputs_s1, inputs_s2, stamps = s1[:, :-1], s2[:, :-1], batch[1][:, :-1]
    changed = inputs_s1.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 2**model.config.s1_bits
    for training, future_visible in ((True, False), (False, True)):
        no_dropout.train(training)
        with torch.no_grad():
            _, base = no_dropout.forward_train(inputs_s1, inputs_s2, stamps, s1_next=s1[:, 1:])
            _, moved = no_dropout.forward_train(changed, inputs_s2, stamps, s1_next=s1[:, 1:])
        # a change at the last input position reaches earlier s2 logits only through the
        # s2 head's keys, and only in eval mode (full attention)
        assert bool((base[:, :-1] - moved[:, :-1]).abs().max() > 1e-6) is future_visible


@pytest.mark.parametrize("mode", ["fast", "rolling", "reference"])
def test_generation_refuses_a_network_in_training_mode(parity_dir: Path, mode: str) -> None:
    """Dropout and the causal s2 head are training-only: generation needs eval mode."""
    from model_package.kronos import SeriesInput, generate

    tokenizer, model = load_tokenizer(parity_dir / "tokenizer"), load_model(parity_dir / "model")
    series = [SeriesInput(torch.zeros(8, 6), torch.zeros(10, 5), pred_len=2)]
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        generate(tokenizer, model, series, 16, mode)
    model.eval()
    outputs, _ = generate(tokenizer, model, series, 16, mode)
    assert outputs[0] is not None and outputs[0].paths.shape == (1, 2, 6)
