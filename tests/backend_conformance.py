"""The conformance suite every backend passes: subclass :class:`BackendConformance` in a
``test_backend_<id>.py`` with ``backend = "<id>"``. Each test lowers a quantized model and checks
the backend's outputs against the reference backend (the numerical ground truth)."""
import dataclasses

import pytest
import torch

import qcompile
from conftest import TinyBlock, TinyCNN, randomise_bn

RECIPES = ["w8a8", "w8a8-dynamic", "w8"]


def _quantize(model, recipe, batches, dynamic_shapes="auto"):
    r = dataclasses.replace(qcompile.resolve_recipe(recipe), calibration=qcompile.CalibrationConfig(progress=False))
    return qcompile.quantize(model, r, batches[0], calibration=batches, report_samples=1, dynamic_shapes=dynamic_shapes)


def assert_matches_reference(out, ref, rel=1e-4):
    """Backends compute the same Q/DQ graph; float reassociation is the only allowed difference."""
    assert type(out) is type(ref)
    for o, r in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        assert o.shape == r.shape and o.dtype == r.dtype
        err = (o - r).abs().max().item()
        assert err <= rel * r.abs().max().item() + 1e-6, f"max |backend - reference| = {err}"


class BackendConformance:
    backend: str = ""

    def lower(self, qmodel):
        return qcompile.lower(qmodel, backend=self.backend)

    @pytest.mark.parametrize("recipe", RECIPES)
    def test_transformer_block_matches_reference(self, recipe):
        torch.manual_seed(0)
        model = TinyBlock().eval()
        g = torch.Generator().manual_seed(2)
        batches = [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(4)]
        q = _quantize(model, recipe, batches)
        art = self.lower(q)
        for ids, mask in [batches[1], (torch.randint(0, 50, (5, 11), generator=g), torch.ones(5, 11, dtype=torch.long))]:
            mask[0, -3:] = 0
            with torch.no_grad():
                assert_matches_reference(art(ids, mask), q(ids, mask))
        with torch.no_grad():  # positional inputs passed by keyword
            assert_matches_reference(art(batches[1][0], mask=batches[1][1]), q(*batches[1]))

    def test_cnn_matches_reference(self):
        torch.manual_seed(0)
        model = randomise_bn(TinyCNN()).eval()
        batches = [(torch.randn(4, 1, 8, 8),) for _ in range(3)]
        q = _quantize(model, "w8a8", batches)
        art = self.lower(q)
        x = torch.randn(6, 1, 8, 8)  # another batch size than the example
        with torch.no_grad():
            # a backend may run conv chains as integer kernels (onnxruntime's QLinearConv), whose
            # requantization rounds intermediate codes differently by up to one step: allow 1 %
            assert_matches_reference(art(x), q(x), rel=1e-2)

    def test_verify_holds_per_quantizer(self):
        """The parity contract: every static activation quantizer's codes within one step."""
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(4)
        batches = [(torch.randint(0, 50, (4, 9), generator=g), torch.ones(4, 9, dtype=torch.long)) for _ in range(3)]
        q = _quantize(TinyBlock().eval(), "w8a8", batches)
        parity = qcompile.verify(self.lower(q), q, batches)
        assert parity.passed, str(parity)
        assert parity.samples == 3 and parity.output_max_rel < 1e-3
        if hasattr(self.lower(q), "quantized_activations"):
            assert len(parity.points) == 4 and all(p.count > 0 for p in parity.points)

    def test_artifact_saves(self, tmp_path):
        torch.manual_seed(0)
        model = TinyBlock().eval()
        batches = [(torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long))]
        art = self.lower(_quantize(model, "w8", batches))
        path = art.save(tmp_path / "model")
        assert path.exists() and path.stat().st_size > 0
