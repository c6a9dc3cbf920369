"""Workspace: views stay valid when it grows; reset reuses, release frees."""

import torch

from kfac_tn.kernels.unfold_gram import unfolded_feature_chunks
from kfac_tn.runtime.workspace import Workspace


def test_views_survive_growth_and_reset_reuses_memory():
    ws = Workspace()
    like = torch.zeros(1)
    a = ws.take((2, 3), like).fill_(1.0)
    b = ws.take((100,), like).fill_(2.0)  # does not fit: new buffer, a untouched
    assert torch.equal(a, torch.ones(2, 3)) and torch.equal(b, torch.full((100,), 2.0))
    ws.reset()
    c = ws.take((50,), like)
    e = ws.take((50,), like)
    assert e.data_ptr() == c.data_ptr() + 50 * c.element_size()  # one buffer, front to back
    ws.reset()
    assert ws.take((50,), like).data_ptr() == c.data_ptr()  # reused, not reallocated
    d = ws.take((10,), torch.zeros(1, dtype=torch.float64))  # other dtype: own buffer
    assert d.dtype == torch.float64
    ws.release()
    assert ws.take((4,), like).shape == (4,)


def test_feature_chunks_from_a_dirty_workspace_keep_padding_zero():
    """A reused buffer holds old values; the padding entries must still read as zero."""
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(3, 2, 4, 4)
    from kfac_tn.factors.layers import conv_input

    xp, dims = conv_input(conv, x)
    fresh = torch.cat([u.clone() for u in unfolded_feature_chunks(xp, dims, chunk_bytes=64)], dim=-1)
    ws = Workspace()
    ws.take((10_000,), x).fill_(float("nan"))
    ws.reset()
    reused = torch.cat([u.clone() for u in unfolded_feature_chunks(xp, dims, chunk_bytes=64, workspace=ws)], dim=-1)
    assert torch.equal(reused, fresh)


def test_first_buffer_after_release_has_the_previous_peak_size():
    ws = Workspace()
    like = torch.zeros(1)
    ws.take((10,), like)
    ws.take((30,), like)  # grows: 40 in use at the peak
    ws.release()
    first = ws.take((5,), like)
    second = ws.take((35,), like)  # fits in the same, full-size buffer
    assert second.data_ptr() == first.data_ptr() + 5 * first.element_size()
