"""The JAX model's DM loss and gradient equal an independent, hand-derived numpy + pmesh
implementation (benchmarks/baseline.py): loss to 1e-12, gradient to 1e-8 relative (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.baseline import NumpyPmeshDMLayer
from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.loss import masked_losses, split_masks


@pytest.mark.parametrize("phys", [(0.02, 0.8, 0.7, 5.0, -0.5), (-0.01, 1.3, 0.0, 2.0, -2.0)])
def test_dm_layer_loss_and_gradient_match_numpy_pmesh(phys):
    n, box = 32, 25.0
    pm = JaxEngine(n, box, dtype="f8")
    pos = zeldovich_particles(n, box, seed=1, rms_disp=0.5, dtype=np.float64)
    target = np.asarray(pm.density(pos)) * 0.9 + 0.1
    stage = Stage(pm, StageConfig("dm", 1))
    masks = split_masks(pm)
    raw = jnp.asarray(stage.table.to_raw(dict(zip(stage.table.names, phys, strict=True))))

    def loss(r):
        F = stage.forward(jnp.asarray(pos), r)
        return masked_losses(pm, F, jnp.asarray(target), masks, 2)["train"]

    val, g = jax.value_and_grad(loss)(raw)
    g_phys = np.asarray(g) / stage.table.scale
    ref = NumpyPmeshDMLayer(pos, target, np.asarray(masks["train"]), n, box, "f8")
    val_ref, g_ref = ref.loss_and_grad(*phys)
    assert float(val) == pytest.approx(val_ref, rel=1e-12)
    np.testing.assert_allclose(g_phys, g_ref, rtol=1e-8)
