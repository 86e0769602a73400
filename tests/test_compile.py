"""torch.compile(fullgraph=True) over the op and the loss: one graph, eager's numbers."""
import pytest
import torch

import sgdpo_fast as sf
from sgdpo_fast.losses import pilots


def _problem(B=2, T=9, D=16, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    t = torch.randint(0, V, (2 * B, T), generator=g)
    t[:, :3] = -100      # prompt
    t[1, -2:] = -100     # padding
    ref = torch.randn(2 * B, T, generator=g) * 0.3 - 3.0
    mask = t != -100
    pm = pilots.draw_pilot_masks(mask, 0.6, 0.9, "different", torch.Generator().manual_seed(1))
    return h, w, t, ref, mask, pm


@pytest.mark.parametrize("backend_kw", ["auto", "torch"])
def test_fullgraph_compile_matches_eager(backend_kw):
    torch._dynamo.reset()
    h, w, t, ref, mask, pm = _problem()

    def step(h, w, t, ref, mask, pm):
        lp = sf.fused_token_logprobs(h, w, t, softcap=7.0, backend=backend_kw)
        out = sf.preference_loss(lp, ref, mask, loss_type="sgdpo", pilot_masks=pm, nll_alpha=0.2)
        return out.loss, out.chosen_rewards

    compiled = torch.compile(step, fullgraph=True)  # raises on any graph break
    results = []
    for fn in (compiled, step):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, rewards = fn(hh, ww, t, ref, mask, pm)
        loss.backward()
        results.append((loss.detach(), rewards, hh.grad, ww.grad))
    (lc, rc, hc, wc), (le, re_, he, we) = results
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rc, re_, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hc, he, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(wc, we, rtol=1e-5, atol=1e-8)
    assert he.abs().max() > 0 and we.abs().max() > 0


def test_compiled_op_still_validates_targets():
    """The data-dependent target check moved into the op: it still fires when compiled."""
    torch._dynamo.reset()
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    f = torch.compile(lambda h, w, t: sf.fused_token_logprobs(h, w, t), fullgraph=True)
    with pytest.raises(Exception, match="outside \\[0, 10\\)"):
        f(h, w, torch.tensor([1, 2, 30, -100]))


def test_compiled_loss_still_validates_masks():
    torch._dynamo.reset()
    h, w, t, ref, mask, pm = _problem()
    lp = sf.fused_token_logprobs(h, w, t)
    bad = mask.clone()
    bad[2] = False
    f = torch.compile(lambda lp, ref, m, pm: sf.preference_loss(lp, ref, m, loss_type="sgdpo",
                                                                pilot_masks=pm & m).loss,
                      fullgraph=True)
    with pytest.raises(Exception, match="pair 0 has no response token in its rejected"):
        f(lp, ref, bad, pm)
