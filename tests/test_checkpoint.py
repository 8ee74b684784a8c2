"""Checkpoints through Orbax's public restore API: the whole state, its parameters alone, the
config and tokenizer records, and a damaged JSON item named by its file."""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.checkpoint import Checkpoints
from lmjax.errors import UserError


def _state():
    return {
        "params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
        "opt": {"mu": jnp.full((2, 3), 7.0)},
        "step": jnp.int32(5),
    }


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ckpts = Checkpoints(directory)
    ckpts.save(1, _state(), {"model": {"d_model": 32}}, tokenizer={"kind": "byte", "vocab_size": 257})
    ckpts.save(2, _state(), {"model": {"d_model": 32}}, heldout_loss=2.5)  # saved without a tokenizer record
    ckpts.wait()
    ckpts.close()
    return directory


def test_state_params_config_and_tokenizer_come_back(saved):
    ckpts = Checkpoints(saved, read_only=True)
    state = ckpts.restore_state(2, _abstract(_state()))
    params = ckpts.restore_params(2, _abstract(_state()["params"]))
    assert jax.tree.structure(params) == jax.tree.structure(_state()["params"])
    for restored in (state["params"], params):
        for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(_state()["params"])):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(state["opt"]["mu"], _state()["opt"]["mu"])
    assert ckpts.restore_config(1) == {"model": {"d_model": 32}}
    assert ckpts.restore_tokenizer(1) == {"kind": "byte", "vocab_size": 257}
    assert ckpts.restore_tokenizer(2) is None
    assert ckpts.best_step() == 2


def test_checkpoints_record_orbax_own_handlers(saved):
    """Any Orbax reader opens them: lmjax's JSON adapter and its partial restore leave no trace."""
    import orbax.checkpoint as ocp

    recorded = Checkpoints(saved, read_only=True).manager.metadata(1).item_handlers
    json_type = ocp.handlers.JsonCheckpointHandler.typestr()
    assert recorded == {
        "state": ocp.handlers.StandardCheckpointHandler.typestr(),
        "config": json_type,
        "tokenizer": json_type,
    }


def test_damaged_config_is_named_by_its_file(saved, tmp_path):
    """NamedJsonHandler adds the file to Orbax's JSON parse error: this fails if Orbax stops
    calling it, or moves the file the message names."""
    copy = tmp_path / "checkpoints"
    shutil.copytree(saved, copy)
    config_file = copy / "2" / "config" / "metadata"
    config_file.write_text('{"model": {"d_mod')
    expected = f"cannot read {config_file} (JSONDecodeError); the previous checkpoint is step 1"
    with pytest.raises(UserError, match=re.escape(expected)):
        Checkpoints(copy, read_only=True).restore_config(2)
